"""A model's artifacts on the platform: the run state uploaded in the background as training writes it (so a
preempted or restarted service resumes), staged back for a resume, dropped when the run is complete, checked
after dtlpy's upload (which only logs a failure, so a model could end 'trained' without weights), and the stamp
that tells whether the weights behind them changed."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import dtlpy as dl
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

from adapters.clip_finetune.errors import ModelError
from adapters.clip_finetune.model.clip import FINETUNE_CONFIG_NAME, METRICS_NAME
from adapters.clip_finetune.training import CHECKPOINT_NAME

from .platform import PLATFORM_ERRORS, feature_sets_of, item_size

logger = logging.getLogger(__name__)

# what a restarted run needs: the resume checkpoint and the best-so-far artifact (uploaded as they change)
RUN_STATE_FILES = (CHECKPOINT_NAME, HF_SAFE_WEIGHTS_NAME, HF_CONFIG_NAME, FINETUNE_CONFIG_NAME, METRICS_NAME)
REQUIRED_ARTIFACTS = (HF_SAFE_WEIGHTS_NAME, HF_CONFIG_NAME)  # what stock open_clip needs to load the model


class RunStateSync:
    """The run state of one training of `model`, kept in its artifacts while the run goes on.

    The checkpoint is about 3x the model: uploading it on the training thread would stall every epoch for as
    long as the upload takes. upload() takes a snapshot (hard links: training replaces each file atomically,
    so a link keeps the version it saw) and one background thread uploads the newest snapshot; finish() waits.
    """

    def __init__(self, model: dl.Model) -> None:
        self.model = model
        self.uploaded: dict[str, int] = {}  # run-state file -> mtime_ns of its last snapshot
        self._lock = threading.Lock()
        self._latest: Path | None = None  # the newest snapshot not uploaded yet
        self._running: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="run-state-upload")
        self._snapshots = Path(tempfile.mkdtemp(prefix="clip-run-state-"))

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
        """Queue the checkpoint training just wrote, and the best-so-far weights when they changed, for upload in
        the background; returns at once. A snapshot still waiting is replaced by this newer one."""
        snapshot = self._snapshot(checkpoint.parent)
        if snapshot is None:
            return
        with self._lock:
            stale, self._latest = self._latest, snapshot
            if self._running is None:
                self._running = self._pool.submit(self._drain)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)

    def _snapshot(self, folder: Path) -> Path | None:
        changed = [n for n in RUN_STATE_FILES
                   if (folder / n).is_file() and self.uploaded.get(n) != (folder / n).stat().st_mtime_ns]
        if not changed:
            return None
        snapshot = Path(tempfile.mkdtemp(dir=self._snapshots))
        for name in changed:
            self.uploaded[name] = (folder / name).stat().st_mtime_ns
            try:
                os.link(folder / name, snapshot / name)
            except OSError:  # another file system, or links not allowed: copy
                shutil.copy2(folder / name, snapshot / name)
        return snapshot

    def _drain(self) -> None:
        """Upload snapshots until none is waiting. A failure is logged: training goes on."""
        while True:
            with self._lock:
                snapshot, self._latest = self._latest, None
                if snapshot is None:
                    self._running = None
                    return
            for path in sorted(snapshot.iterdir()):
                try:
                    self.model.artifacts.upload(filepath=str(path), overwrite=True)
                except PLATFORM_ERRORS as e:
                    logger.warning("could not upload %s (a restart would resume from an older state): %s",
                                   path.name, e)
            shutil.rmtree(snapshot, ignore_errors=True)

    def finish(self) -> None:
        """Wait for the uploads in progress (a failed run leaves its last state for a restart to resume)."""
        with self._lock:
            running = self._running
        if running is not None:
            running.result()
        self._pool.shutdown(wait=True)
        shutil.rmtree(self._snapshots, ignore_errors=True)

    def drop_checkpoint(self) -> None:
        """The run is complete: remove its resume checkpoint (~3x the model) from the artifacts, before dtlpy's
        upload re-lists them, so a later train_model continues training instead of resuming a finished run."""
        self.finish()
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


def weights_stamp(model: dl.Model) -> tuple[tuple[str, str, int | None, str | None], ...]:
    """What identifies the weights in a model's artifacts now: name, item, size and update time of each. A
    retrained model keeps its artifact items (uploads overwrite them) but not their update time."""
    return tuple(sorted((a.name, a.id, item_size(a), a.updated_at) for a in model.artifacts.list()))


def drop_stale_vectors(model: dl.Model) -> None:
    """The model's weights changed (it was trained again): the vectors in its feature sets were made by the
    old weights and would be kept (embedding skips items that have a vector), so the sets are deleted; the next
    embedding creates a fresh one."""
    try:
        for feature_set in feature_sets_of(model):
            feature_set.delete()
            logger.info("model %r was trained again: deleted its feature set %r (vectors of the old weights)",
                        model.name, feature_set.name)
    except PLATFORM_ERRORS as e:
        logger.warning("model %r was trained again but its old vectors could not be deleted (%s): embedding "
                       "would keep them; delete its feature set by hand", model.name, e)
