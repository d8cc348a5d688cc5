"""training.checkpoint: what a checkpoint holds (the selection's and the sampler's state with the tensors and
the progress), and the refusal of one this version does not write."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAINING

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import load_splits
from adapters.clip_finetune.data.synthetic import write_dataloop_download
from adapters.clip_finetune.training import CHECKPOINT_NAME, finetune
from adapters.clip_finetune.training.checkpoint import CHECKPOINT_VERSION, RunMismatch


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_config) -> tuple:
    """One epoch of the tiny model with validation; a copy of each checkpoint it wrote."""
    root = tmp_path_factory.mktemp("checkpoint")
    cfg = build_config({**TINY_TRAINING, "model_name": str(tiny_model_config), "num_epochs": 1,
                        "unique_batches": True, "early_stopping_epochs": 4})
    write_dataloop_download(root / "data", 48, 16, seed=1)
    splits = load_splits(root / "data", cfg=cfg)
    copies: list[Path] = []

    def keep(path: Path) -> None:
        copies.append(shutil.copy(path, root / f"copy{len(copies)}.pt"))

    finetune(cfg, splits, root / "out", on_checkpoint=keep, progress=False)
    return cfg, splits, root, copies


def test_a_checkpoint_holds_the_selection_and_the_sampler_state(run) -> None:
    _, _, _, copies = run
    state = torch.load(copies[-1], map_location="cpu", weights_only=True)
    assert state["version"] == CHECKPOINT_VERSION
    assert state["sampler"] == {"kind": "unique", "n": 48, "batch_size": 16, "seed": 42}
    assert state["selection"]["metric"] == "text_to_image/mrr" and state["selection"]["patience"] == 4
    assert state["progress"]["epoch"] == 2 and state["progress"]["finished"]


def test_a_checkpoint_of_another_version_is_refused_by_name(run) -> None:
    cfg, splits, root, copies = run
    out = root / "old"
    out.mkdir()
    state = torch.load(copies[-1], map_location="cpu", weights_only=True)
    torch.save({**state, "version": CHECKPOINT_VERSION - 1}, out / CHECKPOINT_NAME)
    with pytest.raises(RunMismatch, match=rf"not a checkpoint this version writes \(version {CHECKPOINT_VERSION - 1}"):
        finetune(cfg, splits, out, resume=True, progress=False)
