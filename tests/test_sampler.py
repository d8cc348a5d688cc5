"""training.sampler: the batches of each epoch, the same after a resume, duplicates spread when asked."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.clip_finetune.training.sampler import BatchSampler


def test_batches_are_full_seeded_per_epoch_and_cover_distinct_pairs() -> None:
    sampler = BatchSampler(n=50, batch_size=8, seed=3)
    first = sampler.batches(1)
    assert len(first) == 6 and all(len(b) == 8 for b in first)  # the partial last batch is dropped
    indices = [i for b in first for _, i in b]
    assert len(set(indices)) == 48 and all(e == 1 for b in first for e, _ in b)
    assert BatchSampler(n=50, batch_size=8, seed=3).batches(1) == first  # the same run draws the same batches
    assert sampler.batches(2) != first and BatchSampler(n=50, batch_size=8, seed=4).batches(1) != first


def test_unique_batches_hold_fewer_repeated_images() -> None:
    images = np.arange(64) // 2  # every image has two captions
    captions = np.arange(64)
    plain = BatchSampler(n=64, batch_size=16, seed=0)
    unique = BatchSampler(n=64, batch_size=16, seed=0, keys=(images, captions))
    clashes = [sum(16 - len({images[i] for _, i in b}) for b in s.batches(1)) for s in (plain, unique)]
    assert clashes == [11, 3]  # seeded: a plain shuffle pairs 11 images with themselves, the spread 3 (the tail)
    assert (plain.kind, unique.kind) == ("shuffled", "unique")


def test_a_checkpoint_of_another_sampler_is_refused() -> None:
    sampler = BatchSampler(n=64, batch_size=16, seed=0)
    BatchSampler(n=64, batch_size=16, seed=0).load_state_dict(sampler.state_dict())  # its own: accepted
    other = BatchSampler(n=64, batch_size=16, seed=0, keys=(np.arange(64), np.arange(64)))
    with pytest.raises(ValueError, match="drawn by"):
        other.load_state_dict(sampler.state_dict())
