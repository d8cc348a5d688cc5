"""A full disk or a file-size limit while saving weights or a checkpoint: one message (never torch's or safetensors'
traceback), the last good checkpoint kept, and no half-written model that a later run takes for finished."""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.data.synthetic import write_dataloop_download
from adapters.clip_finetune.errors import user_error
from adapters.clip_finetune.files import atomic_write
from adapters.clip_finetune.training.guard import check_output_folder
from adapters.clip_finetune.training.state import CHECKPOINT_NAME

TRAIN = ["--set", f"model_name={TINY_MODEL}", "--set", "pretrained=none", "--set", "num_workers=0",
         "--set", "learning_rate=1e-3", "--set", "train_batch_size=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataloop_download(tmp_path_factory.mktemp("disk") / "data", n_train=32, n_validation=16, seed=3)


@contextlib.contextmanager
def _limited(limit_bytes: int) -> Iterator[None]:
    """The file-size limit a shell's `ulimit -f` sets, on this process for the block (the soft limit only: the
    hard one stays, so it can be raised back). Python ignores SIGXFSZ, so a write past it fails with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize(("limit", "failing"), [(5_000_000, "open_clip_model.safetensors"),
                                                (20_000_000, CHECKPOINT_NAME)])
def test_a_file_size_limit_ends_in_one_message_and_leaves_no_model(data: Path, tmp_path: Path, limit: int,
                                                                   failing: str, capsys) -> None:
    # the tiny model's weights are 14 MB, its checkpoint about 42 MB: 5 MB stops the weights, 20 MB the checkpoint
    out = tmp_path / "out"
    with _limited(limit):
        code = main(["train", "--data", str(data), "--out", str(out), *TRAIN, "--set", "num_epochs=1"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (f"clip-finetune train: error: '{out / failing}': file too large; the file-size limit (ulimit -f) "
                    "was reached; raise it or write elsewhere")
    left = sorted(p.name for p in out.iterdir())
    assert "open_clip_model.safetensors" not in left and "open_clip_config.json" not in left, left
    assert not any(name.endswith(".tmp") for name in left), left
    check_output_folder(out)  # nothing there that a later run must --overwrite or takes for a finished model


class _FailingSave:
    """torch.save, but the n-th call (1-based) writes half a file and raises what torch raises when the disk refuses
    a write (PytorchStreamWriter's enforce failure, a RuntimeError)."""

    def __init__(self, real, fail_on: int) -> None:
        self.real, self.fail_on, self.calls = real, fail_on, 0

    def __call__(self, obj, f, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return self.real(obj, f, *args, **kwargs)


def test_a_checkpoint_write_that_fails_keeps_the_last_good_one_and_resume_finishes(
        data: Path, tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    out = tmp_path / "out"
    failing = _FailingSave(torch.save, fail_on=2)  # epoch 1's checkpoint is written, epoch 2's fails
    monkeypatch.setattr(torch, "save", failing)
    args = ["train", "--data", str(data), "--out", str(out), *TRAIN, "--set", "num_epochs=3",
            "--set", "early_stopping_epochs=5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"clip-finetune train: error: '{out / CHECKPOINT_NAME}': ")
    state = torch.load(out / CHECKPOINT_NAME, weights_only=True)  # the last good checkpoint, whole
    assert state["progress"]["epoch"] == 2 and not state["progress"]["finished"]
    assert (out / "open_clip_model.safetensors").is_file()  # with its checkpoint: an unfinished run, not a model
    with pytest.raises(Exception, match="an unfinished run"):
        check_output_folder(out)
    monkeypatch.setattr(torch, "save", failing.real)
    caplog.set_level(logging.INFO, logger="adapters.clip_finetune")
    assert main([*args, "--resume"]) == 0
    assert "resuming from" in caplog.text
    assert not (out / CHECKPOINT_NAME).exists()


def test_safetensors_on_a_full_disk_is_one_message_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    target = tmp_path / "open_clip_model.safetensors"
    save_file({"w": torch.ones(3)}, str(target))

    def full_disk(path: Path) -> None:
        path.write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError) as caught:
        atomic_write(target, full_disk)
    assert caught.value.errno == errno.ENOSPC
    assert str(user_error(caught.value)) == (f"'{target}': no space left on device; free some disk space or "
                                             "write elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary file left
    from safetensors.torch import load_file

    assert load_file(str(target))["w"].tolist() == [1.0, 1.0, 1.0]

    def a_bug(path: Path) -> None:  # not the disk: stays what it is (a bug of ours keeps its traceback)
        raise SafetensorError("Error while serializing: shape mismatch")

    with pytest.raises(SafetensorError):
        atomic_write(target, a_bug)


def test_a_checkpoint_with_pairs_out_of_range_is_refused_on_resume(data: Path, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(torch, "save", _FailingSave(torch.save, fail_on=2))  # leaves epoch 1's checkpoint
    args = ["train", "--data", str(data), "--out", str(out), *TRAIN, "--set", "num_epochs=2"]
    assert main(args) == 2
    monkeypatch.undo()
    state = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    state["progress"]["bad_pairs"] = [3, 10**6]  # a damaged (or hand-edited) checkpoint
    torch.save(state, out / CHECKPOINT_NAME)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "records training pairs out of range ([1000000] of 32): it is damaged" in err and "Traceback" not in err
