"""A model's artifacts on the platform: the run state uploaded as training writes it (so a preempted or
restarted service resumes), staged back for a resume, dropped when the run is complete, and checked after
dtlpy's upload (which only logs a failure, so a model could end 'trained' without weights)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import dtlpy as dl
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

from adapters.clip_finetune.errors import ModelError
from adapters.clip_finetune.model.clip import FINETUNE_CONFIG_NAME, METRICS_NAME
from adapters.clip_finetune.training import CHECKPOINT_NAME

from .platform import PLATFORM_ERRORS, item_size

logger = logging.getLogger(__name__)

# what a restarted run needs: the resume checkpoint and the best-so-far artifact (uploaded as they change)
RUN_STATE_FILES = (CHECKPOINT_NAME, HF_SAFE_WEIGHTS_NAME, HF_CONFIG_NAME, FINETUNE_CONFIG_NAME, METRICS_NAME)
REQUIRED_ARTIFACTS = (HF_SAFE_WEIGHTS_NAME, HF_CONFIG_NAME)  # what stock open_clip needs to load the model


class RunStateSync:
    """The run state of one training of `model`, kept in its artifacts while the run goes on."""

    def __init__(self, model: dl.Model) -> None:
        self.model = model
        self.uploaded: dict[str, int] = {}  # run-state file -> mtime_ns of its last upload

    def stage(self, source: Path | None, output: Path) -> bool:
        """A preempted or restarted run left its checkpoint (and best-so-far weights) in the model's artifacts,
        downloaded to `source`: put them where training resumes from. False when there is none (a fresh run)."""
        if source is None or not (source / CHECKPOINT_NAME).is_file():
            return False
        # the download folder is keyed by model NAME: a same-named model's stale checkpoint is not ours
        if CHECKPOINT_NAME not in {a.name for a in self.model.artifacts.list()}:
            logger.warning("ignoring %s in %s: not an artifact of model %s", CHECKPOINT_NAME, source, self.model.id)
            return False
        output.mkdir(parents=True, exist_ok=True)
        for name in RUN_STATE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, output / name)
        logger.info("model %r has a checkpoint from an interrupted run: resuming it", self.model.name)
        return True

    def upload(self, checkpoint: Path) -> None:
        """Upload the checkpoint training just wrote, and the best-so-far weights when they changed. A failure is
        logged: training goes on."""
        for name in RUN_STATE_FILES:
            path = checkpoint.parent / name
            if not path.is_file() or self.uploaded.get(name) == path.stat().st_mtime_ns:
                continue
            try:
                self.model.artifacts.upload(filepath=str(path), overwrite=True)
                self.uploaded[name] = path.stat().st_mtime_ns
            except PLATFORM_ERRORS as e:
                logger.warning("could not upload %s (a restart would resume from an older state): %s", name, e)

    def drop_checkpoint(self) -> None:
        """The run is complete: remove its resume checkpoint (~3x the model) from the artifacts, before dtlpy's
        upload re-lists them, so a later train_model continues training instead of resuming a finished run."""
        if CHECKPOINT_NAME not in self.uploaded:
            return
        try:
            self.model.artifacts.delete(artifact_name=CHECKPOINT_NAME)
        except PLATFORM_ERRORS as e:
            logger.warning("could not delete the finished run's %s artifact: %s", CHECKPOINT_NAME, e)


def check_artifacts(model_id: str, local: Path) -> None:
    """Raise ModelError unless the model, read back from the platform, references every file of the folder
    dtlpy uploaded (the required ones first) at the size written locally (a same-named model's stale files
    would not match)."""
    model = dl.models.get(model_id=model_id)
    referenced = {a.id for a in model.model_artifacts}
    uploaded = {a.name: a for a in model.artifacts.list() if a.id in referenced}
    others = sorted(p.name for p in local.iterdir() if p.is_file() and p.name not in REQUIRED_ARTIFACTS)
    files = [*REQUIRED_ARTIFACTS, *others]
    missing = [n for n in files if n not in uploaded or item_size(uploaded[n]) != (local / n).stat().st_size]
    if not missing:
        return
    required = [m for m in missing if m in REQUIRED_ARTIFACTS]
    rest = [m for m in missing if m not in REQUIRED_ARTIFACTS]
    what = f"{', '.join(required or rest)} did not reach the platform"
    if required and rest:
        what += f", nor did {', '.join(rest)}"
    raise ModelError(
        f"model {model.name!r} ({model.id}): {len(missing)} of {len(files)} artifact files were not stored: "
        f"{what} (the upload failed; see the dtlpy errors above); its artifacts are "
        f"{sorted(uploaded) or 'none'}. Re-run training, or upload the folder {str(local.resolve())!r} with "
        "model.artifacts.upload(...)"
    )
