"""Retrieval evaluation of a model on caption pairs, both directions (formulas in metrics.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import EVAL_KS
from .embed import encode_images, encode_texts
from .errors import DataError
from .metrics import retrieval_metrics
from .model import ClipModel
from .pairs import CaptionPair


@dataclass
class PairEmbeddings:
    """Embeddings of an evaluation set: each distinct image once, each caption once."""

    images: list[str]  # distinct image paths, in order of first appearance
    image_features: np.ndarray  # [n_images, d]
    captions: list[str]
    text_features: np.ndarray  # [n_texts, d]
    text_to_image: np.ndarray  # [n_texts] index into images of the image each caption describes


def embed_pairs(
    clip: ClipModel, pairs: Sequence[CaptionPair], batch_size: int = 64, num_workers: int | None = None
) -> PairEmbeddings:
    """Embed the distinct images and the captions of `pairs` (several captions of one image share it)."""
    images = list(dict.fromkeys(p.image for p in pairs))
    vectors, kept = encode_images(clip, images, batch_size, num_workers, progress=False)
    # images that failed to decode are dropped, and the captions that describe them with them
    images = [images[i] for i in kept]
    index = {path: i for i, path in enumerate(images)}
    usable = [p for p in pairs if p.image in index]
    if not usable:
        raise DataError(f"none of the {len(pairs)} evaluation pairs has a decodable image")
    captions = [p.caption for p in usable]
    text_features = encode_texts(clip, captions, batch_size=max(batch_size, 256))
    text_to_image = np.array([index[p.image] for p in usable], dtype=np.int64)
    return PairEmbeddings(images, vectors, captions, text_features, text_to_image)


def evaluate(
    clip: ClipModel,
    pairs: Sequence[CaptionPair],
    batch_size: int = 64,
    num_workers: int | None = None,
    ks: Sequence[int] = EVAL_KS,
) -> dict[str, float]:
    """Text->image and image->text retrieval metrics of `clip` on `pairs` (flat 'direction/metric' keys)."""
    emb = embed_pairs(clip, pairs, batch_size, num_workers)
    return retrieval_metrics(emb.image_features, emb.text_features, emb.text_to_image, ks)
