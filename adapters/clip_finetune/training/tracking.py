"""Experiment tracking: a run's configuration, every epoch's metrics, the before/after table and the saved model
folder, logged to MLflow or Weights & Biases (the `tracking` key: "none", "mlflow", "wandb").

Nothing is imported unless chosen. MLflow goes where MLFLOW_TRACKING_URI points; unset, MLflow's own default (a
local `mlflow.db` with the artifacts in `./mlruns`, where `mlflow ui` finds them). Weights & Biases logs online
when WANDB_API_KEY is set (or WANDB_MODE says so) and offline otherwise, into the run's folder (`wandb sync`
uploads it later). A tracker that fails while logging warns and stops logging; it never stops the training.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

TRACKERS = ("none", "mlflow", "wandb")
EXPERIMENT = "clip-finetune"
# the resume state (large, of no use once the run has finished) and the trackers' own folders
KEPT_LOCAL = {"checkpoint.pt", "wandb", "mlruns"}
MAX_PARAM = 6000  # MLflow's limit on a parameter value's length


def _flat(config: dict[str, Any]) -> dict[str, str]:
    return {k: (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM] for k, v in config.items()}


def _shared_files(folder: Path) -> list[Path]:
    """The files of a saved model folder a tracker stores: all but the checkpoint and hidden or tracker files."""
    return [p for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(part in KEPT_LOCAL or part.startswith(".") for part in p.relative_to(folder).parts)]


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One tracked run. Subclasses implement _start, _epoch, _result, _folder and _finish; this class turns a
    tracker's own failure into one warning and silence, so tracking never ends a training."""

    name = "none"

    def __init__(self, run_name: str, config: dict[str, Any], folder: Path | None) -> None:
        self.run_name, self.folder, self.failed = run_name, folder, False
        self._call(self._start, config)

    def _call(self, fn: Any, *args: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # a tracking server down or a full disk must not cost the training
            self.failed = True
            log.warning("tracking with %s stopped: %s: %s (training goes on)", self.name, type(e).__name__, e)

    def log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        self._call(self._epoch, epoch, _numbers(record))

    def log_result(self, result: dict[str, Any]) -> None:
        """The run's figures: {"before": {metric: v}, "after": {metric: v}, ...} (TrainResult.to_dict())."""
        self._call(self._result, result)

    def log_folder(self, folder: Path) -> None:
        """The saved model (and report) as artifacts; the checkpoint stays local."""
        self._call(self._folder, folder)

    def finish(self, ok: bool) -> None:
        self._call(self._finish, ok)

    def close(self, result: dict[str, Any], folder: Path | None) -> None:
        """A finished run: its figures, the saved model folder when one was written, and the end."""
        self.log_result(result)
        if folder is not None:
            self.log_folder(folder)
        self.finish(ok=True)


class MlflowTracker(Tracker):
    name = "mlflow"

    @staticmethod
    def metric_name(key: str) -> str:
        """MLflow allows letters, digits, _ - . space : / in names: recall@5 -> recall_at_5."""
        return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))

    def _start(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's default store
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(k, v) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _metrics(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self.metric_name(prefix + k), v, now, step)
                                                    for k, v in values.items()])

    def _epoch(self, epoch: int, record: dict[str, float]) -> None:
        self._metrics(record, epoch)

    def _result(self, result: dict[str, Any]) -> None:
        for side in ("before", "after"):
            self._metrics(_numbers(result.get(side) or {}), 0, f"{side}/")
        self.client.log_dict(self.run_id, result, "result.json")

    def _folder(self, folder: Path) -> None:
        for path in _shared_files(folder):
            sub = path.parent.relative_to(folder).as_posix()
            self.client.log_artifact(self.run_id, str(path), "model" if sub == "." else f"model/{sub}")

    def _finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbTracker(Tracker):
    name = "wandb"

    def _start(self, config: dict[str, Any]) -> None:
        import wandb

        online = bool(os.environ.get("WANDB_API_KEY")) or os.environ.get("WANDB_MODE") == "online"
        where = str(self.folder.parent) if self.folder is not None else None  # beside the model, not in it
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", EXPERIMENT), name=self.run_name,
                              config=config, mode="online" if online else "offline", dir=where,
                              reinit="create_new")

    def _epoch(self, epoch: int, record: dict[str, float]) -> None:
        self.run.log(record, step=epoch)

    def _result(self, result: dict[str, Any]) -> None:
        import wandb

        before, after = result.get("before") or {}, result.get("after") or {}
        self.run.summary.update({f"{side}/{k}": v for side, values in (("before", before), ("after", after))
                                 for k, v in _numbers(values).items()})
        rows = [[k, before.get(k), after.get(k)] for k in sorted(_numbers(after))]
        self.run.log({"before_after": wandb.Table(columns=["metric", "before", "after"], data=rows)})

    def _folder(self, folder: Path) -> None:
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^\w\-.]", "-", f"model-{self.run_name}"), type="model")
        for path in _shared_files(folder):
            artifact.add_file(str(path), name=path.relative_to(folder).as_posix())
        self.run.log_artifact(artifact)

    def _finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def require_tracker(kind: str) -> None:
    """Fail before any work when the chosen tracker's package is missing."""
    import importlib.util

    if kind != "none" and importlib.util.find_spec(kind) is None:
        raise ConfigError(f"tracking: {kind!r} needs the {kind} package: pip install \"clip-finetune[{kind}]\" "
                          f"(from a checkout: pip install -e \".[{kind}]\"), or set tracking to \"none\"")


def open_tracker(kind: str, run_name: str, config: dict[str, Any], folder: Path | None = None) -> Tracker | None:
    """The tracker `kind` names, started with the run's configuration; None for "none"."""
    if kind == "none":
        return None
    require_tracker(kind)
    return {"mlflow": MlflowTracker, "wandb": WandbTracker}[kind](run_name, config, folder)
