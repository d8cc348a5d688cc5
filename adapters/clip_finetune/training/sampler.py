"""The batch sampler: which training pairs go together in each step. A seeded permutation per epoch, cut into
full batches; with `unique_batches` (or a duplicate-aware loss) reordered so a batch holds distinct images and
captions where the data allows; with `hard_negatives`, regrouped so each caption shares its batch with the
images the model confuses it with (hard_negatives.py). Its state travels in the checkpoint: a resumed run draws
the same batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import FinetuneConfig
from ..data.datasets import epoch_batches
from ..data.pairs import CaptionPair
from ..model.clip import ClipModel
from .distributed import DistContext
from .hard_negatives import HardNegatives, group_hard, mined_per_caption, miner

Batch = list[tuple[int, int]]  # (epoch, pair index) per pair: the keys PairDataset reads


@dataclass(kw_only=True)
class BatchSampler:
    """The batches of each epoch of a run over `n` training pairs."""

    n: int
    batch_size: int
    seed: int
    keys: tuple[np.ndarray, np.ndarray] | None = None  # (image ids, caption ids) per pair: spread duplicates
    hard: HardNegatives | None = None  # mined hard negatives grouped into each batch

    @property
    def kind(self) -> str:
        return "hard" if self.hard is not None else "unique" if self.keys is not None else "shuffled"

    def batches(self, epoch: int) -> list[Batch]:
        """Every batch of `epoch` (1-based), in order; the same for the same seed, epoch and data (and, with hard
        negatives, the same weights at the epoch's start: the mining happens here, once per epoch)."""
        if self.hard is None:
            return epoch_batches(self.n, self.batch_size, self.seed, epoch, self.keys)
        order = [i for _, i in epoch_batches(self.n, self.n, self.seed, epoch)[0]] if self.n else []
        order = group_hard(order, self.batch_size, self.hard.per_anchor, self.hard.for_epoch(epoch),
                           self.hard.image_ids, self.hard.caption_ids)
        return [[(epoch, i) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
                for b in range(self.n // self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        state = {"kind": self.kind, "n": self.n, "batch_size": self.batch_size, "seed": self.seed}
        return state if self.hard is None else {**state, "hard_negatives": self.hard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's sampler must be this one (a resumed run continues the same sequence of batches); with
        hard negatives, the epoch in progress keeps the negatives mined at its start."""
        mine, theirs = _identity(self.state_dict()), _identity(state)
        if mine != theirs:
            raise ValueError(f"the checkpoint's batches were drawn by {theirs}, this run's by {mine}")
        if self.hard is not None:
            self.hard.load_state_dict(state["hard_negatives"])


def _identity(state: dict[str, Any]) -> dict[str, Any]:
    """What must match for a resumed run to draw the same batches (the mined lists are restored, not compared)."""
    hard = state.get("hard_negatives")
    return {**{k: v for k, v in state.items() if k != "hard_negatives"},
            **({"hard_negatives": hard.get("per_anchor")} if isinstance(hard, dict) else {})}


def batch_sampler(cfg: FinetuneConfig, pairs: Sequence[CaptionPair], clip: ClipModel,
                  keys: tuple[np.ndarray, np.ndarray] | None, num_workers: int | None, ctx: DistContext | None
                  ) -> BatchSampler:
    """The run's sampler: shuffled; unique (unique_batches: duplicates spread); or with cfg.hard_negatives mined by
    `clip` each epoch. keys: the pairs' (image ids, caption ids), which the last two need."""
    hard = None
    if cfg.hard_negatives and keys is not None:
        mine = miner(clip, pairs, keys, mined_per_caption(cfg.hard_negatives), cfg.batch_size, num_workers, ctx)
        hard = HardNegatives(cfg.hard_negatives, keys[0], keys[1], mine)
    return BatchSampler(n=len(pairs), batch_size=cfg.train_batch_size, seed=cfg.seed,
                        keys=keys if cfg.unique_batches else None, hard=hard)
