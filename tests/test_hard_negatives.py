"""training.hard_negatives: the model's own hardest non-relevant images per caption (duplicate-aware), grouped into
each caption's batch, mined once per epoch and kept in the checkpoint so a resumed run draws the same batches.
The effect on retrieval is measured by bench/hard_negatives.py (docs/data.md), not asserted here."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAINING
from safetensors.torch import load_file

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import Splits, load_splits
from adapters.clip_finetune.data.synthetic import write_dataloop_download
from adapters.clip_finetune.training import CHECKPOINT_NAME, finetune
from adapters.clip_finetune.training.hard_negatives import HardNegatives, group_hard, hardest
from adapters.clip_finetune.training.sampler import BatchSampler


def _unit(rows: list[list[float]]) -> np.ndarray:
    a = np.asarray(rows, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_the_hardest_images_are_the_most_similar_that_are_not_relevant() -> None:
    images = _unit([[1, 0, 0], [0.9, 0.1, 0], [0.8, 0.2, 0], [0, 1, 0], [0, 0, 1]])  # ids 0..4
    texts = _unit([[1, 0, 0], [0.1, 0.3, 1]])  # caption 0 ~ image 0, caption 1 ~ image 4
    # caption 0 was given to images 0 and 1 (a shared caption: both relevant); image 2 failed to decode (no row)
    links = np.array([[0, 0], [0, 1], [1, 4]])
    mined = hardest(images[[0, 1, 3, 4]], [0, 1, 3, 4], texts, links, m=4)
    assert mined[0].tolist() == [3, 4, -1, -1]  # 0 and 1 are relevant, 2 has no embedding; then none is left
    assert mined[1].tolist() == [3, 1, 0, -1]  # by similarity (0.30, 0.13, 0.10); 4 is its own


def test_each_pair_comes_once_and_a_caption_shares_its_batch_with_its_hardest_images() -> None:
    n, batch = 24, 8
    image_ids, caption_ids = np.arange(n), np.arange(n)
    neighbours = np.array([[(i + 5) % n, (i + 11) % n, (i + 13) % n] for i in range(n)])
    order = list(np.random.default_rng(0).permutation(n))
    grouped = group_hard(order, batch, 2, neighbours, image_ids, caption_ids)
    assert sorted(grouped) == list(range(n))
    batches = [set(grouped[b : b + batch]) for b in range(0, n, batch)]
    anchor = grouped[0]  # the first pair opens a group: its two hardest images follow it
    assert grouped[1:3] == [(anchor + 5) % n, (anchor + 11) % n]
    together = sum(any({i, (i + 5) % n} <= b for b in batches) for i in range(n))
    assert together >= n // 3  # a shuffle puts a given pair beside a given other one for about n/3 x 7/23 pairs


def test_a_pair_whose_image_or_caption_is_in_the_batch_already_is_not_pulled_in() -> None:
    image_ids = np.array([0, 1, 1, 2])  # pairs 1 and 2 share an image; pairs 0 and 3 a caption
    caption_ids = np.array([0, 1, 2, 0])
    neighbours = np.array([[1, 2], [2, 0], [2, 0]])
    assert group_hard([0, 3, 1, 2], 4, 2, neighbours, image_ids, caption_ids) == [0, 1, 3, 2]
    # pair 3 (caption 0, in the batch already) is not pulled in by image 2, so it waits for its own turn


def _sampler(calls: list[int], per_anchor: int = 2) -> BatchSampler:
    def mine() -> np.ndarray:
        calls.append(1)
        return np.array([[(i + len(calls)) % 32, (i + 7) % 32, -1] for i in range(32)])

    hard = HardNegatives(per_anchor, np.arange(32), np.arange(32), mine)
    return BatchSampler(n=32, batch_size=8, seed=1, hard=hard)


def test_mining_happens_once_per_epoch_and_a_restored_sampler_draws_the_same_batches() -> None:
    calls: list[int] = []
    sampler = _sampler(calls)
    first = sampler.batches(1)
    assert sampler.batches(1) == first and len(calls) == 1  # once per epoch
    state = sampler.state_dict()
    assert state["kind"] == "hard" and state["hard_negatives"]["epoch"] == 1
    restored_calls: list[int] = [1, 1, 1]  # its miner would give other lists: it must not be asked
    restored = _sampler(restored_calls)
    restored.load_state_dict(state)
    assert restored.batches(1) == first and len(restored_calls) == 3
    assert sampler.batches(2) != first and len(calls) == 2
    with pytest.raises(ValueError, match="drawn by"):
        _sampler([], per_anchor=3).load_state_dict(state)
    with pytest.raises(ValueError, match="drawn by"):
        BatchSampler(n=32, batch_size=8, seed=1).load_state_dict(state)


def test_a_run_resumed_mid_epoch_keeps_the_mined_batches_and_ends_with_the_same_weights(tmp_path: Path,
                                                                                       tiny_model_config) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(tiny_model_config), "num_epochs": 2,
                        "hard_negatives": 3, "checkpoint_every_steps": 1, "early_stopping": False})
    write_dataloop_download(tmp_path / "data", 32, 4, seed=1)  # 2 steps an epoch
    splits = Splits(load_splits(tmp_path / "data", cfg=cfg).train, None)  # no validation: no evaluations to wait for
    mined: list[torch.Tensor] = []  # each epoch's lists, from its first checkpoint
    mid = tmp_path / "killed"

    def snapshot(path: Path) -> None:  # epoch 2 after its first step: the folder a run killed there leaves
        state = torch.load(path, weights_only=True)
        if state["progress"]["batches_done"] == 1:
            mined.append(state["sampler"]["hard_negatives"]["neighbours"])
            if state["progress"]["epoch"] == 2:
                shutil.copytree(path.parent, mid)

    finetune(cfg, splits, tmp_path / "whole", on_checkpoint=snapshot, progress=False)
    state = torch.load(mid / CHECKPOINT_NAME, weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["batches_done"]) == (2, 1)
    assert state["sampler"]["hard_negatives"]["epoch"] == 2 and state["sampler"]["hard_negatives"]["per_anchor"] == 3
    assert len(mined) == 2 and mined[1].shape == (32, 11)  # 11 kept per caption: 3 and some spare
    assert not torch.equal(mined[0], mined[1])  # epoch 2 mined again, by the weights epoch 1 left
    finetune(cfg, splits, mid, resume=True, progress=False)
    a, b = load_file(str(tmp_path / "whole" / "open_clip_model.safetensors")), load_file(
        str(mid / "open_clip_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
