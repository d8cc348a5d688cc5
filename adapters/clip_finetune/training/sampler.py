"""The batch sampler: which training pairs go together in each step. A seeded permutation per epoch, cut into
full batches; with `unique_batches` (or a duplicate-aware loss) reordered so a batch holds distinct images and
captions where the data allows. Its state travels in the checkpoint: a resumed run draws the same batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.datasets import epoch_batches

Batch = list[tuple[int, int]]  # (epoch, pair index) per pair: the keys PairDataset reads


@dataclass(kw_only=True)
class BatchSampler:
    """The batches of each epoch of a run over `n` training pairs."""

    n: int
    batch_size: int
    seed: int
    keys: tuple[np.ndarray, np.ndarray] | None = None  # (image ids, caption ids) per pair: spread duplicates

    @property
    def kind(self) -> str:
        return "unique" if self.keys is not None else "shuffled"

    def batches(self, epoch: int) -> list[Batch]:
        """Every batch of `epoch` (1-based), in order; the same for the same seed, epoch and data."""
        return epoch_batches(self.n, self.batch_size, self.seed, epoch, self.keys)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's sampler must be this one (a resumed run continues the same sequence of batches)."""
        if state != self.state_dict():
            raise ValueError(f"the checkpoint's batches were drawn by {state}, this run's by {self.state_dict()}")
