"""torch Datasets over caption pairs and image files; undecodable images are dropped and counted."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..errors import DataError
from ..inputs import cap_captions
from ..machine import cpu_cores, thread_map
from ..progress import progress as show_progress
from .batch_tail import Tail, finish_all, split_tail
from .decode_cache import DecodedCache, InputCache
from .images import decode, load_image
from .pairs import CaptionPair

log = logging.getLogger(__name__)


class BadSample(NamedTuple):
    """A sample whose image could not be decoded: which one, and why (collate counts and drops it)."""

    index: int
    reason: str


Sample = tuple[torch.Tensor, torch.Tensor, int]  # (image [3, H, W], tokens [context_length], pair index)


class PairDataset(Dataset):
    """(image tensor, caption tokens, index) per pair; a BadSample where the image cannot be decoded.

    Keys are (epoch, index): the random augmentation of a sample is seeded by (seed, epoch, index), so it
    does not depend on worker processes or on where a resumed run restarted (exact resume). With a
    `cache` (fastpath.DecodedCache) images are decoded once, shrunk, and kept across epochs.
    """

    def __init__(self, pairs: Sequence[CaptionPair], transform: Callable, tokenizer: Callable, seed: int = 0,
                 cache: DecodedCache | None = None, progress: bool = False) -> None:
        self.pairs = list(pairs)
        self.transform = transform
        # ToTensor + Normalize run once per batch on the samples' uint8 pixels (batch_tail.py: bit-identical)
        self._head, self._tail = split_tail(transform)
        self.seed = seed
        self.cache = cache
        # Tokenize every caption once, up front: [n_pairs, context_length]. open_clip's tokenizers
        # truncate captions longer than the context (an over-long caption is not an error); cap_captions cuts
        # them before, to a length the tokenizer handles in bounded time.
        captions = cap_captions((p.caption for p in self.pairs), getattr(tokenizer, "context_length", None))
        self.tokens = tokenize_all(tokenizer, captions, progress)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> Sample | BadSample:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Sample | BadSample]:
        """A batch: each sample decoded and augmented with its own seed, then the transform's tensor steps on
        all of them at once."""
        samples = [self._augment(key, self._decode(key[1])) for key in keys]
        return _tensor_steps(samples, self._tail) if self._tail is not None else samples

    def _decode(self, i: int) -> Image.Image | BadSample:
        try:
            return self.cache.get(i, self.pairs[i].image) if self.cache is not None else load_image(self.pairs[i].image)
        except DataError as e:
            log.warning("skipping %s: %s", self.pairs[i].item_id or self.pairs[i].image, e)
            return BadSample(i, "undecodable image")

    def _augment(self, key: tuple[int, int], image: Image.Image | BadSample) -> Sample | BadSample:
        if isinstance(image, BadSample):
            return image
        epoch, i = key
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from the global RNG
            # the CPU generator only, as torch.manual_seed does for CPU transforms: torch.manual_seed also
            # queues CUDA/XPU/MPS seeding with a stack trace each, ~1.7 ms a sample (docs/performance.md)
            torch.default_generator.manual_seed(hash((self.seed, epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self._head(image), self.tokens[i], i


TOKENIZE_CHUNK = 4096  # captions per tokenizer call: progress on large sets, the same tokens as one call


def tokenize_all(tokenizer: Callable, texts: list[str], progress: bool = False) -> torch.Tensor:
    """Tokens of every text, [n, context_length], tokenized in chunks (each caption is tokenized on its own,
    so chunking changes nothing but the progress shown)."""
    if not texts:
        return torch.empty(0)
    chunks = [texts[i : i + TOKENIZE_CHUNK] for i in range(0, len(texts), TOKENIZE_CHUNK)]
    shown = show_progress(chunks, "tokenize captions", unit="chunk", enabled=progress and len(chunks) > 1)
    return torch.cat([tokenizer(chunk) for chunk in shown])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, keys: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> list[list[tuple[int, int]]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), cut into full batches (the last,
    partial one is dropped: a contrastive step on a few pairs is noise). Keys are (epoch, index).

    `keys` (image ids, caption ids per pair): reorder so each batch holds distinct images and captions where
    the data allows (spread_duplicates); the number of batches stays the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if keys is not None:
        order = spread_duplicates(order, batch_size, *keys)
    return [[(epoch, i) for i in order[b * batch_size : (b + 1) * batch_size]] for b in range(n // batch_size)]


def spread_duplicates(order: list[int], batch_size: int, image_ids: np.ndarray, caption_ids: np.ndarray,
                      lookahead: int = 4) -> list[int]:
    """`order` rearranged so that each batch takes the next pairs whose image and caption are not in it yet
    (looking at most lookahead x batch_size pairs ahead), and is filled up with clashing pairs only when no
    other is in reach (a label caption shared by a whole class cannot be avoided). Passed-over pairs come
    first in the next batch, so every pair keeps its turn within the epoch."""
    queue, out = deque(order), []
    while len(queue) >= batch_size:
        batch, deferred, images, captions = [], [], set(), set()
        for _ in range(min(len(queue), lookahead * batch_size)):
            i = queue.popleft()
            if image_ids[i] in images or caption_ids[i] in captions:
                deferred.append(i)
            else:
                batch.append(i)
                images.add(image_ids[i])
                captions.add(caption_ids[i])
                if len(batch) == batch_size:
                    break
        fill = batch_size - len(batch)
        batch += deferred[:fill]
        queue.extendleft(reversed(deferred[fill:]))
        out += batch
    return out + list(queue)


ImageSource = str | Path | bytes | Image.Image  # an image file, its bytes, or an image already decoded


def model_input(source: ImageSource, transform: Callable, draft: int | None = None, name: str | None = None
                ) -> torch.Tensor:
    """An image as the model takes it: decoded (load_image; a PIL image gets the same orientation and RGB
    conversion) and transformed. `draft`: JPEGs are decoded at reduced scale, never below `draft` pixels a
    side (the transform's size), so the transform still only shrinks."""
    return transform(decode(source, name, draft))


class ImageDataset(Dataset):
    """(image tensor, index) per image (path, bytes or PIL image); a BadSample where it cannot be decoded.
    With `inputs` (an InputCache of the same transform and draft size) images are made through it."""

    def __init__(self, sources: Sequence[ImageSource], transform: Callable, draft: int | None = None,
                 inputs: InputCache | None = None) -> None:
        self.sources = list(sources)
        self.transform = transform
        self.draft = draft
        self.inputs = inputs
        # the tensor steps of the transform run once per batch (batch_tail.py: bit-identical)
        self._head, self._tail = split_tail(transform)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | BadSample:
        try:
            if self.inputs is not None:
                return self.inputs(self.sources[i]), i
            return model_input(self.sources[i], self.transform, self.draft), i
        except DataError as e:
            log.warning("skipping image %s: %s", _label(self.sources[i], i), e)
            return BadSample(i, "undecodable image")

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int] | BadSample]:
        """A batch: decoded and taken through the transform's PIL steps on threads (the eval transform is
        deterministic), then its tensor steps on the whole batch."""
        if self._tail is None or (self.inputs is not None and not self.inputs.splits_like(self._tail)):
            return thread_map(self.__getitem__, indices)
        return _tensor_steps(thread_map(self._head_of, indices), self._tail)

    def _head_of(self, i: int) -> tuple[object, int] | BadSample:
        """(image i through the transform's steps before the tensor ones (InputCache: its kept pixels), i)."""
        try:
            if self.inputs is not None:
                return self.inputs.head_of(self.sources[i]), i
            return self._head(decode(self.sources[i], None, self.draft)), i
        except DataError as e:
            log.warning("skipping image %s: %s", _label(self.sources[i], i), e)
            return BadSample(i, "undecodable image")


def _tensor_steps(samples: list[Any], tail: Tail) -> list[Any]:
    """`samples` (tuples whose first item is an image before `tail`, or BadSamples) with the tail run on all
    their images at once (batch_tail.finish_all); BadSamples stay as they are."""
    good = [j for j, sample in enumerate(samples) if not isinstance(sample, BadSample)]
    images = finish_all([samples[j][0] for j in good], tail)
    out = list(samples)
    for j, image in zip(good, images, strict=True):
        out[j] = (image, *samples[j][1:])
    return out


def _label(source: ImageSource, i: int) -> str:
    return str(source) if isinstance(source, str | Path) else f"#{i}"


def collate_skipping_bad(batch: list[Any]) -> tuple[Any, list[BadSample]]:
    """Collate the decodable samples; also return the ones dropped."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [b for b in batch if isinstance(b, BadSample)]
    return (default_collate(good) if good else None), bad


def default_num_workers(requested: int | None, device: torch.device | None = None, processes: int = 1) -> int:
    """Worker processes for decoding: the requested count, else a count that fits the machine.

    `processes`: training processes sharing the machine (distributed runs); each gets its share of the cores.
    On CUDA the GPU computes, so every core but one decodes (up to 8). On a CPU the model's own threads
    need the cores: worker processes beside them oversubscribe a small machine (measured on 2 cores:
    a training step went from 0.25 s to 2.6 s as OpenMP threads spun against the worker), so only
    machines with 8+ cores get workers, a quarter of the cores.
    """
    if requested is not None:
        return requested
    cores = max(1, cpu_cores() // processes)
    if device is not None and device.type == "cuda":
        return max(0, min(8, cores - 1))
    return cores // 4 if cores >= 8 else 0
