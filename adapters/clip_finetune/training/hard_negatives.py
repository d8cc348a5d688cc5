"""Hard negatives (`hard_negatives` N > 0): each epoch's batches put each caption beside the N images the model
itself ranks highest for it among those that do not match it, so the contrastive loss sees the confusions that
matter instead of random, mostly easy, negatives (the idea of ANCE-style mining in dense retrieval: negatives
from the model's own index, refreshed as it trains).

At the start of every epoch the model as it is then embeds every distinct training image (the evaluation
transform: no augmentation) and caption once; for each caption the most similar images that are not relevant to
it are kept (duplicate-aware, as the loss and the evaluation: an image is relevant to a caption when any training
pair gives that caption, normalised, to that image content, so another photo of a shared class caption is
never a "negative"). The epoch's seeded permutation is then regrouped: each pair not yet placed opens a group
and pulls in a pair of each of its hardest non-relevant images, up to N, skipping images and captions the batch
already holds. Every pair still comes once per epoch and the number of batches stays the same.

The mined lists of the epoch in progress travel in the checkpoint (sampler state): a resumed run draws the
same batches without mining again from weights that have moved on. Cost: one forward pass over the training
images and captions per epoch (no backward: about a third of an epoch's compute, plus decoding each image
again) and a [captions x images] similarity search in blocks; docs/performance.md has the measurement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.pairs import CaptionPair
from ..model.clip import ClipModel
from .distributed import DistContext, broadcast

log = logging.getLogger(__name__)

_BLOCK_CELLS = 1 << 25  # similarity cells scored at once (128 MiB of float32)


def mined_per_caption(per_anchor: int) -> int:
    """How many hardest images to keep per caption: some spare for those the batch cannot take (already in it)."""
    return max(2 * per_anchor, per_anchor + 8)


def hardest(image_features: np.ndarray, image_rows: Sequence[int], text_features: np.ndarray, links: np.ndarray,
            m: int, device: torch.device | str = "cpu") -> np.ndarray:
    """[n_captions, m] image ids, most similar first, of the images NOT relevant to each caption (-1: none left).

    image_features [n_rows, d] are the images `image_rows` (their ids; undecodable images have no row and are
    never chosen); text_features [n_captions, d], row = caption id; links [n_links, 2] (caption id, image id):
    the relevant pairs."""
    n_captions = len(text_features)
    out = np.full((n_captions, m), -1, dtype=np.int64)
    if not len(image_rows) or not n_captions:
        return out
    images = torch.as_tensor(image_features, dtype=torch.float32, device=device)
    ids = torch.as_tensor(np.asarray(image_rows, np.int64), device=device)
    column = {int(i): c for c, i in enumerate(image_rows)}
    links = links[np.argsort(links[:, 0], kind="stable")] if len(links) else links.reshape(0, 2)
    starts = np.searchsorted(links[:, 0], np.arange(n_captions + 1))
    take = min(m, len(image_rows))
    step = max(1, _BLOCK_CELLS // len(image_rows))
    for s in range(0, n_captions, step):
        e = min(s + step, n_captions)
        sim = torch.as_tensor(text_features[s:e], dtype=torch.float32, device=device) @ images.T  # [e-s, n_rows]
        own = [(c - s, column[int(i)]) for c, i in links[starts[s] : starts[e]].tolist() if int(i) in column]
        if own:
            rows, cols = zip(*own, strict=True)
            sim[list(rows), list(cols)] = float("-inf")  # relevant: not a negative
        scores, idx = sim.topk(take, dim=1)
        chosen = ids[idx].masked_fill(torch.isinf(scores), -1)
        out[s:e, :take] = chosen.cpu().numpy()
    return out


def group_hard(order: Sequence[int], batch_size: int, per_anchor: int, neighbours: np.ndarray,
               image_ids: np.ndarray, caption_ids: np.ndarray) -> list[int]:
    """`order` (a permutation of the pairs) regrouped: each pair not yet placed is followed by a pair of each of
    its caption's hardest images (neighbours[caption id]), up to `per_anchor`, skipping images and captions the
    batch already holds and never crossing into the next batch. Every pair is placed exactly once."""
    pairs_of: dict[int, list[int]] = {}
    for i in order:  # an image's pairs in the epoch's shuffled order: which of them joins a group varies by epoch
        pairs_of.setdefault(int(image_ids[i]), []).append(int(i))
    cursor: dict[int, int] = {}
    placed = np.zeros(len(image_ids), dtype=bool)
    out: list[int] = []
    images: set[int] = set()
    captions: set[int] = set()

    def place(i: int) -> None:
        out.append(i)
        placed[i] = True
        if len(out) % batch_size == 0:  # a new batch starts: nothing clashes with it yet
            images.clear()
            captions.clear()
        else:
            images.add(int(image_ids[i]))
            captions.add(int(caption_ids[i]))

    for anchor in order:
        if placed[anchor]:
            continue
        place(int(anchor))
        room = 0 if len(out) % batch_size == 0 else min(per_anchor, batch_size - len(out) % batch_size)
        for image in neighbours[caption_ids[anchor]].tolist():
            if room == 0 or image < 0:
                break
            j = _next_unplaced(pairs_of.get(image, ()), cursor, image, placed)
            if j is None or image in images or int(caption_ids[j]) in captions:
                continue
            place(j)
            room -= 1
    return out


def _next_unplaced(pairs: Sequence[int], cursor: dict[int, int], image: int, placed: np.ndarray) -> int | None:
    k = cursor.get(image, 0)
    while k < len(pairs) and placed[pairs[k]]:
        k += 1
    cursor[image] = k
    return pairs[k] if k < len(pairs) else None


@dataclass
class HardNegatives:
    """The mining of a run: `mine()` gives the current model's hardest images per caption; `for_epoch` mines once
    per epoch and keeps the result (checkpointed through the sampler's state)."""

    per_anchor: int
    image_ids: np.ndarray  # [n_pairs] image id of each training pair (by content)
    caption_ids: np.ndarray  # [n_pairs] caption id (normalised text)
    mine: Callable[[], np.ndarray] = field(repr=False)
    epoch: int = 0  # the epoch `neighbours` were mined for (0: none yet)
    neighbours: np.ndarray | None = field(default=None, repr=False)  # [n_captions, m] image ids, -1 padded

    def for_epoch(self, epoch: int) -> np.ndarray:
        if self.neighbours is None or self.epoch != epoch:
            started = time.perf_counter()
            self.neighbours, self.epoch = self.mine(), epoch
            log.info("hard negatives: mined %d per caption for %d captions in %.1f s (epoch %d)",
                     self.neighbours.shape[1], len(self.neighbours), time.perf_counter() - started, epoch)
        return self.neighbours

    def state_dict(self) -> dict[str, Any]:
        none = torch.zeros(0, 0, dtype=torch.int64)
        mined = torch.from_numpy(self.neighbours) if self.neighbours is not None else none
        return {"per_anchor": self.per_anchor, "epoch": self.epoch, "neighbours": mined}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mined = state["neighbours"]
        self.epoch = int(state["epoch"])
        self.neighbours = mined.numpy().astype(np.int64) if self.epoch else None


def miner(clip: ClipModel, pairs: Sequence[CaptionPair], keys: tuple[np.ndarray, np.ndarray], m: int,
          batch_size: int, num_workers: int | None, ctx: DistContext | None) -> Callable[[], np.ndarray]:
    """mine(): the hardest `m` images per caption id for `clip` as it is when called (rank 0 mines, every rank
    gets its result). The model is put back in training mode afterwards."""
    from ..model.weights import unwrap
    from ..retrieval.embed import encode_images, encode_texts

    image_ids, caption_ids = keys
    first_image = np.unique(image_ids, return_index=True)[1]  # the first pair of each image id, by id
    first_caption = np.unique(caption_ids, return_index=True)[1]
    links = np.unique(np.stack([caption_ids, image_ids], axis=1), axis=0)

    def mine() -> np.ndarray:
        result = None
        if ctx is None or ctx.is_main:
            model = unwrap(clip.model)
            training = model.training
            try:
                vectors, kept = encode_images(clip, [pairs[i].image for i in first_image], batch_size, num_workers,
                                              progress=False)
                texts = encode_texts(clip, [pairs[i].caption for i in first_caption], max(batch_size, 256))
            finally:
                model.train(training)
            result = hardest(vectors, [int(image_ids[first_image[r]]) for r in kept], texts, links, m, clip.device)
        return broadcast(result) if ctx is not None else result

    return mine
