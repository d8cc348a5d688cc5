"""Experiment tracking (`tracking: mlflow | wandb`): a training run's configuration, every epoch's metrics, the
before/after figures and the saved model, read back from MLflow's store through its client and from the
Weights & Biases offline run folder; nothing imported unless chosen; a tracker's failure never costs the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb_log
from helpers import TINY_TRAINING, set_args

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.data.synthetic import write_csv
from adapters.clip_finetune.training.tracking import MlflowTracker, Tracker, open_tracker

EPOCHS = 2


def _train(tmp_path: Path, tracking: str, tiny_model_config: Path) -> Path:
    table = write_csv(tmp_path / "pairs.csv", 48, seed=5)
    validation = write_csv(tmp_path / "val" / "val.csv", 24, seed=6)
    out = tmp_path / "run-a" / "model"
    argv = ["train", "--data", str(table), "--validation", str(validation), "--out", str(out),
            "--set", f"tracking={tracking}",
            *set_args({**TINY_TRAINING, "model_name": tiny_model_config, "num_epochs": EPOCHS,
                       "early_stopping_epochs": EPOCHS})]
    assert main(argv) == 0
    return out


def test_mlflow_holds_the_config_each_epoch_the_figures_and_the_model(tmp_path: Path, tiny_model_config: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) is relative to the working folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = _train(tmp_path, "mlflow", tiny_model_config)
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("clip-finetune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == json.dumps(TINY_TRAINING["learning_rate"])
    assert run.data.params["num_epochs"] == str(EPOCHS)
    metric = MlflowTracker.metric_name("text_to_image/recall@5")
    assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == list(range(1, EPOCHS + 1))
    after = json.loads((out / "metrics.json").read_text())["after"]
    assert run.data.metrics[f"after/{metric}"] == pytest.approx(after["text_to_image/recall@5"])
    uploaded = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/open_clip_model.safetensors", "model/README.md", "model/data_report.json"} <= uploaded
    assert "model/checkpoint.pt" not in uploaded


def test_wandb_offline_run_holds_the_config_each_epoch_the_figures_and_the_model(
        tmp_path: Path, tiny_model_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = _train(tmp_path, "wandb", tiny_model_config)
    wandb.teardown()  # wandb's core process writes the log asynchronously: read it as `wandb sync` would, after
    (log,) = (out.parent / "wandb").glob("offline-run-*/run-*.wandb")  # beside the model, not inside it
    assert not (out / "wandb").exists()
    steps = [h for h in wandb_log.history(log) if "text_to_image/recall@5" in h]
    assert [json.loads(h["_step"]) for h in steps] == list(range(1, EPOCHS + 1))
    after = json.loads((out / "metrics.json").read_text())["after"]
    summary = wandb_log.summary(log)
    assert json.loads(summary["after/text_to_image/recall@5"]) == pytest.approx(after["text_to_image/recall@5"])
    assert json.loads(wandb_log.config(log)["learning_rate"]) == TINY_TRAINING["learning_rate"]
    files = wandb_log.artifacts(log)["model-run-a"]
    assert {"open_clip_model.safetensors", "README.md", "metrics.json"} <= set(files)


def test_no_tracker_is_opened_unless_chosen() -> None:
    # and none is imported: training's modules import with mlflow and wandb blocked (test_core_without_dtlpy.py,
    # whose child blocks them beside dtlpy)
    assert open_tracker("none", "r", {}) is None


def test_a_missing_tracker_package_stops_the_run_before_any_work(tmp_path: Path, tiny_model_config: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(AssertionError):
        _train(tmp_path, "wandb", tiny_model_config)
    assert 'needs the wandb package: pip install "clip-finetune[wandb]"' in capsys.readouterr().err
    assert not (tmp_path / "run-a" / "model").exists()


def test_a_tracker_that_fails_warns_once_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Tracker):
        name = "broken"
        calls: list[str] = []

        def _start(self, config: dict) -> None:
            self.calls.append("start")

        def _epoch(self, epoch: int, record: dict) -> None:
            self.calls.append("epoch")
            raise ConnectionError("tracking server down")

        def _finish(self, ok: bool) -> None:
            self.calls.append("finish")

    tracker = Broken("r", {}, None)
    tracker.log_epoch(1, {"loss": 1.0})
    tracker.log_epoch(2, {"loss": 0.5})
    tracker.finish(True)
    assert Broken.calls == ["start", "epoch"]  # silent after the first failure
    assert [r.getMessage() for r in caplog.records] == [
        "tracking with broken stopped: ConnectionError: tracking server down (training goes on)"]
