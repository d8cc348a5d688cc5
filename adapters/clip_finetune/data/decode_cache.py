"""Faster image input, measured in docs/performance.md: JPEG draft decoding at reduced scale, a decode-once
uint8 cache of training images with a memory budget (over it, images are decoded each epoch), and one of
evaluation inputs (InputCache: validation images decoded and preprocessed once per training run).

Each keeps the result of the straightforward path, exactly or within tolerance (tests/test_fast_paths.py):
draft mode decodes a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain, never below the size the model's transform
resizes to, so the transform still only shrinks.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .batch_tail import Tail
from .images import decode, load_image

log = logging.getLogger(__name__)

# open_clip's training crop, RandomResizedCrop(scale=(0.9, 1), ratio=(3/4, 4/3)), keeps at least ~0.8 of the
# short side: an image stored with its short side at 1.25x the model's input is still only shrunk by it.
TRAIN_SIDE_FACTOR = 1.25


def transform_size(transform: Callable) -> int | None:
    """The output side of an open_clip image transform (its Resize / RandomResizedCrop), else None."""
    for t in getattr(transform, "transforms", ()):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, list | tuple) and size:
            return int(min(size))
    return None


def load_reduced(source: str | Path, side: int) -> Image.Image:
    """Decode (JPEG: draft) and shrink so the short side is `side` (antialiased bicubic; never enlarges)."""
    image = load_image(source, draft=side)
    w, h = image.size
    if min(w, h) <= side:
        return image
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


class DecodedCache:
    """Training images decoded once and shrunk (`load_reduced`), kept as uint8 arrays up to `budget_mb`.

    Images past the budget are decoded on every request by the same code, so a cached and a streamed
    image give identical pixels (exact resume does not depend on what fitted). Lives in the process that
    reads it: with DataLoader worker processes each would hold its own copy, so use it with workers=0.
    """

    def __init__(self, side: int, budget_mb: float) -> None:
        self.side = side
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.full = self.budget <= 0
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._arrays)

    def get(self, key: int, source: str | Path) -> Image.Image:
        """The shrunk RGB image of `source` (cached under `key` while the budget allows)."""
        array = self._arrays.get(key)
        if array is not None:
            return Image.fromarray(array, "RGB")
        image = load_reduced(source, self.side)
        if not self.full:
            array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
            if self.used + array.nbytes <= self.budget:
                self._arrays[key] = array
                self.used += array.nbytes
            else:
                self.full = True
                log.info("image cache full at %d images (%.0f MB); decoding the rest each epoch",
                         len(self._arrays), self.used / 2**20)
        return image


def train_cache(transform: Callable, budget_mb: float, num_workers: int) -> DecodedCache | None:
    """The cache for a training transform, or None where it cannot help (unknown size, workers, no budget)."""
    size = transform_size(transform)
    if size is None:
        return None
    if budget_mb <= 0 or num_workers > 0:
        return DecodedCache(math.ceil(size * TRAIN_SIDE_FACTOR), 0)  # same pixels, nothing kept
    return DecodedCache(math.ceil(size * TRAIN_SIDE_FACTOR), budget_mb)


class InputCache:
    """Evaluation inputs made once: each image decoded and taken through the PIL steps of a deterministic
    transform (open_clip's resize, centre crop, RGB), kept as uint8 up to `budget_mb`; the tensor steps
    (ToTensor, Normalize) run at each use, so a tensor from the cache is bit-identical to a fresh one and
    costs a quarter of a float copy. Images past the budget are made afresh each time by the same code.

    Keyed by file path: only images given as paths are kept. Thread-safe (batches decode on threads).
    """

    def __init__(self, transform: Callable, budget_mb: float, draft: int | None = None) -> None:
        steps = list(getattr(transform, "transforms", ()))
        cut = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor | T.PILToTensor)), None)
        # a transform that is not a Compose ending in tensor steps is applied whole and nothing is kept
        self.head = T.Compose(steps[:cut]) if cut is not None else None
        self.tail = T.Compose(steps[cut:]) if cut is not None else transform
        self.transform, self.draft = transform, draft
        self.budget, self.used = int(budget_mb * 2**20), 0
        self._arrays: dict[str, tuple[np.ndarray, str]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._arrays)

    def __call__(self, source: str | Path | bytes | Image.Image, name: str | None = None) -> torch.Tensor:
        """The model input of `source` ([3, H, W]), as transform(decode(source)) gives it."""
        kept = self.head_of(source, name)
        return kept if isinstance(kept, torch.Tensor) else self.tail(Image.fromarray(*kept))

    def head_of(self, source: str | Path | bytes | Image.Image, name: str | None = None
                ) -> tuple[np.ndarray, str] | torch.Tensor:
        """(uint8 pixels, PIL mode) of `source` after the transform's PIL steps, kept while the budget allows;
        the whole transform's tensor where it has no tensor steps to split off."""
        key = str(source) if isinstance(source, str | Path) else None
        kept = self._arrays.get(key) if key is not None else None
        if kept is None:
            image = decode(source, name, self.draft)
            if self.head is None:
                return self.transform(image)
            image = self.head(image)
            kept = (np.array(image), image.mode)
            if key is not None:
                self._keep(key, kept)
        return kept

    def splits_like(self, tail: Tail) -> bool:
        """True when this cache's tensor steps are exactly `tail`'s two (so its pixels can take the batch path)."""
        steps = list(getattr(self.tail, "transforms", ()))
        return self.head is not None and steps == [tail.to_tensor, tail.normalize]

    def _keep(self, key: str, kept: tuple[np.ndarray, str]) -> None:
        with self._lock:
            if key not in self._arrays and self.used + kept[0].nbytes <= self.budget:
                self._arrays[key] = kept
                self.used += kept[0].nbytes
