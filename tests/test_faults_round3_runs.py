"""Run folders that lost data or told a wrong story (issue 24): a WiSE-FT run stopped after writing its mix and
resumed mixed twice; a folder removed under a running writer and made again by another run was overwritten by the
old one; `--overwrite` kept the old model's onnx/; a run stopped before its first checkpoint could not be resumed;
a recorded pid without a start time was alive forever; `demo --out` replaced a model there without a word."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAINING
from open_clip.constants import HF_SAFE_WEIGHTS_NAME
from safetensors.torch import load_file

import adapters.clip_finetune.training.loop as loop
from adapters.clip_finetune.api.run_folder import create_run, refresh_state, update_state, worker_alive
from adapters.clip_finetune.cli.demo import run_demo
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import Splits, load_dataset
from adapters.clip_finetune.data.synthetic import write_dataloop_download
from adapters.clip_finetune.model.clip import load_model, save_artifact
from adapters.clip_finetune.training import finetune
from adapters.clip_finetune.training.guard import (
    RunFolderError,
    check_output_folder,
    require_locked_folder,
    writer_lock,
)
from adapters.clip_finetune.training.state import CHECKPOINT_NAME


class _Killed(BaseException):
    """A stand-in for SIGKILL at a chosen point: nothing after it runs (not an Exception: no handler sees it)."""


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Splits:
    root = tmp_path_factory.mktemp("synthetic")
    write_dataloop_download(root, 64, 24, seed=3)
    data, reports = load_dataset(root)
    return Splits(data["train"], data["validation"], reports)


@pytest.fixture(scope="module")
def cfg(tiny_model_config: Path):
    return build_config({**TINY_TRAINING, "num_epochs": 2, "train_batch_size": 16, "batch_size": 32,
                         "early_stopping": False, "base_eval_cache": False}, {"model_name": str(tiny_model_config)})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / HF_SAFE_WEIGHTS_NAME))


def test_wise_ft_stopped_after_its_mix_was_written_resumes_and_mixes_once(cfg, splits, tmp_path, monkeypatch):
    wise = build_config(cfg.model_dump(), {"wise_ft_alpha": 0.5})
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    expected = finetune(wise, splits, whole, progress=False)
    assert expected.best_epoch > 0  # the mix is of a trained best and the base: mixing twice would differ
    real = loop.save_artifact

    def stop_after_the_final_write(clip, out, c=None, metrics=None, *args):
        real(clip, out, c, metrics, *args)
        if metrics is not None and "metric" in metrics:  # the final model (the mix): the export would run now
            raise _Killed

    monkeypatch.setattr(loop, "save_artifact", stop_after_the_final_write)
    with pytest.raises(_Killed):
        finetune(wise, splits, stopped, progress=False)
    assert (stopped / CHECKPOINT_NAME).is_file()
    monkeypatch.undo()
    finetune(wise, splits, stopped, progress=False, resume=True)
    a, b = _weights(whole), _weights(stopped)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert sorted(p.name for p in stopped.iterdir()) == sorted(p.name for p in whole.iterdir())  # nothing left over


def test_a_run_never_writes_into_a_folder_made_again_at_its_path(cfg, splits, tmp_path):
    out = tmp_path / "run"

    def another_run_takes_the_path(epoch: int, record: dict) -> None:
        shutil.rmtree(out)  # the folder removed under the running writer ...
        out.mkdir()  # ... and another run's finished model made at the same path
        (out / "open_clip_config.json").write_text('{"theirs": true}')

    one_epoch = build_config(cfg.model_dump(), {"num_epochs": 1})
    with pytest.raises(RunFolderError, match="removed or replaced while this training wrote it"):
        finetune(one_epoch, splits, out, progress=False, on_epoch_end=another_run_takes_the_path)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json"]
    assert (out / "open_clip_config.json").read_text() == '{"theirs": true}'
    folder = tmp_path / "locked"
    folder.mkdir()
    with writer_lock(folder):
        require_locked_folder(folder)  # the same folder: fine
        folder.rmdir()
        with pytest.raises(RunFolderError):
            require_locked_folder(folder)  # gone
    require_locked_folder(folder)  # not locked by this process: nothing to compare


def test_overwrite_removes_the_previous_models_onnx_export(cfg, splits, tmp_path):
    out = tmp_path / "run"
    one_epoch = build_config(cfg.model_dump(), {"num_epochs": 1})
    finetune(one_epoch, splits, out, progress=False)
    (out / "onnx").mkdir()
    (out / "onnx" / "text.onnx").write_bytes(b"the previous model's text tower")
    check_output_folder(out, overwrite=True)
    finetune(one_epoch, splits, out, progress=False)
    assert not (out / "onnx").exists()


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed(cfg, splits, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def killed(run, on_checkpoint):
        raise _Killed

    monkeypatch.setattr(loop, "save_checkpoint", killed)
    monkeypatch.setattr(loop, "drop_unfinished_model", lambda *a: None)  # SIGKILL: no handler runs
    with pytest.raises(_Killed):
        finetune(cfg, splits, out, progress=False)
    monkeypatch.undo()
    assert not (out / CHECKPOINT_NAME).exists() and (out / HF_SAFE_WEIGHTS_NAME).is_file()
    assert check_output_folder(out, resume=True) == out
    result = finetune(cfg, splits, out, progress=False, resume=True)
    assert len(result.history) == 2 and not (out / CHECKPOINT_NAME).exists()
    # a finished model is still refused to --resume (--overwrite replaces it)
    with pytest.raises(RunFolderError, match="already holds a saved model"):
        check_output_folder(out, resume=True)


def test_a_pid_without_a_start_time_is_judged_by_when_that_process_started(tmp_path):
    run = create_run(tmp_path, "r", {})
    update_state(run, pid=1, pid_start=None)  # pid 1 started at boot, long before this run was created
    assert not worker_alive(update_state(run))
    assert refresh_state(run)["status"] == "failed"
    run = create_run(tmp_path, "s", {})
    time.sleep(0.05)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = update_state(run, pid=worker.pid, pid_start=None)
        assert worker_alive(state)  # started after the run was made: may be its worker
        reused = dict(state, started_at="2000-01-01T00:00:00+00:00")  # said it started before this process did
        assert not worker_alive(reused)
    finally:
        worker.kill()
        worker.wait()


def test_demo_does_not_replace_a_model_it_did_not_write(cfg, splits, tmp_path):
    out = tmp_path / "demo"
    save_artifact(load_model(cfg), out / "model", cfg)  # a model of the user's, where the demo would write
    before = _weights(out / "model")
    with pytest.raises(RunFolderError, match=r"already holds a saved model; overwrite replaces it"):
        run_demo(out, n_train=32, n_validation=16, overrides={"num_epochs": 1, "num_workers": 0}, progress=False)
    after = _weights(out / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)
