"""Training survives what hours-long jobs meet: a SIGKILL mid-epoch (resume is exact), untrusted weight files
(never unpickled), crashes while writing. Non-finite steps (skipped, counted, bounded): test_step.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAINING, set_args
from safetensors.torch import load_file

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import Splits
from adapters.clip_finetune.data.pairs import DataReport
from adapters.clip_finetune.data.synthetic import write_csv
from adapters.clip_finetune.data.tables import read_table
from adapters.clip_finetune.errors import ModelError
from adapters.clip_finetune.files import atomic_write
from adapters.clip_finetune.model.clip import load_artifact, load_model
from adapters.clip_finetune.training import CHECKPOINT_NAME, finetune

WEIGHTS = "open_clip_model.safetensors"


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tables")
    return write_csv(root / "train" / "pairs.csv", 96, seed=5), write_csv(root / "val" / "pairs.csv", 32, seed=6)


def _train_cmd(tiny: Path, tables: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    sets = {**TINY_TRAINING, "model_name": tiny, "num_epochs": 3, "checkpoint_every_steps": 2, "early_stopping": False}
    return [sys.executable, "-m", "adapters.clip_finetune", "train", "--data", str(tables[0]),
            "--validation", str(tables[1]), "--out", str(out), *set_args(sets), *extra]


def _env() -> dict[str, str]:
    # one thread in every process: float sums then happen in the same order in all runs
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_equals_an_uninterrupted_run(tiny_model_config, tables, tmp_path,
                                                                   caplog) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _kill_mid_epoch(tiny_model_config, tables, killed)
    # the resumed run and the uninterrupted one in this process (two process starts fewer), on one thread like
    # the killed one's: float sums in the same order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        caplog.set_level(logging.INFO, logger="adapters.clip_finetune.training.loop")
        assert main(_train_cmd(tiny_model_config, tables, killed, "--resume")[3:]) == 0
        assert f"resuming from {killed / CHECKPOINT_NAME}" in caplog.text
        assert main(_train_cmd(tiny_model_config, tables, whole)[3:]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(str(whole / WEIGHTS)), load_file(str(killed / WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _kill_mid_epoch(tiny_model_config: Path, tables: tuple[Path, Path], killed: Path) -> None:
    """A training run into `killed`, SIGKILLed a few checkpoints in; its last checkpoint is left whole."""
    proc = subprocess.Popen(_train_cmd(tiny_model_config, tables, killed), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, seen, deadline = killed / CHECKPOINT_NAME, set(), time.monotonic() + 300
    while len(seen) < 4 and proc.poll() is None and time.monotonic() < deadline:  # a few checkpoints in
        if checkpoint.is_file():
            seen.add(checkpoint.stat().st_mtime_ns)
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(checkpoint, weights_only=True)  # the checkpoint left behind is whole
    assert not state["progress"]["finished"]


@pytest.fixture(scope="module")
def small(tiny_model_config, tables):
    cfg = build_config({**TINY_TRAINING, "model_name": str(tiny_model_config), "num_epochs": 2, "max_bad_steps": 4})
    return cfg, read_table(tables[0]), read_table(tables[1])


def test_undecodable_training_images_are_skipped_and_reported_once(small, tmp_path) -> None:
    cfg, train, val = small
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    train = [*train, type(train[0])(str(broken), "a red circle", "row-broken")]
    report = DataReport(used=len(train))
    result = finetune(cfg, Splits(train, val, {"train": report}), progress=False)
    assert result.skipped_images == 1
    assert report.skipped == {"undecodable image": 1} and report.examples["undecodable image"] == ["row-broken"]
    assert report.used == len(train) - 1


def _malicious_pickle(target: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Payload()}, target)


def test_malicious_pickles_are_refused_without_running_them(tiny_model_config, small, tmp_path) -> None:
    cfg, train, val = small
    marker = tmp_path / "pwned"
    # an artifact folder whose weights are a pickle instead of safetensors
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text('{"model_cfg": ' + tiny_model_config.read_text() + "}")
    _malicious_pickle(folder / "open_clip_pytorch_model.bin", marker)
    with pytest.raises(ModelError, match="no open_clip_model.safetensors"):
        load_artifact(folder)
    # a weights file given as `pretrained`: open_clip loads it with torch.load(weights_only=True); the refusal says
    # what the file is, never torch's advice to load it with weights_only=False
    with pytest.raises(ModelError, match="pretrained: .* will not be loaded: it is a pickle") as refused:
        load_model(build_config(cfg.model_dump(), {"pretrained": str(folder / "open_clip_pytorch_model.bin")}))
    assert "weights_only" not in str(refused.value)
    # a planted resume checkpoint
    out = tmp_path / "out"
    out.mkdir()
    _malicious_pickle(out / CHECKPOINT_NAME, marker)
    with pytest.raises(ModelError, match="the resume checkpoint .* will not be loaded") as refused:
        finetune(cfg, Splits(train, val), out_dir=out, resume=True, progress=False)
    assert "weights_only" not in str(refused.value)
    assert not marker.exists()


def test_a_crash_while_writing_leaves_the_previous_file_whole(tmp_path) -> None:
    target = tmp_path / CHECKPOINT_NAME
    target.write_bytes(b"previous checkpoint")

    def crash_midway(path: Path) -> None:
        path.write_bytes(b"half of a new chec")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash_midway)
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary file left behind
