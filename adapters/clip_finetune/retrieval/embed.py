"""THE embedding pipeline of every entry point (CLI, Python API, Dataloop adapter, evaluation): images and
texts in, float32 unit vectors out, normalised once, in float32.

Images are decoded by data.datasets.model_input (JPEG draft decoding at the model's input size, EXIF
orientation, RGB) and transformed with the model's own preprocessing, whether they come as files, bytes
(a platform item) or PIL images, so the same image gives the same vector from every entry point.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.datasets import ImageDataset, ImageSource, collate_skipping_bad, default_num_workers, model_input
from ..data.decode_cache import InputCache, transform_size
from ..inputs import cap_captions
from ..model import text_trim
from ..model.clip import ClipModel
from ..model.precision import autocast_for
from ..progress import progress as show_progress

log = logging.getLogger(__name__)


def image_input(clip: ClipModel, source: ImageSource, name: str | None = None) -> torch.Tensor:
    """One image as `clip` takes it ([3, H, W]): decoded (JPEG: draft at the input size) and preprocessed.
    Raises ImageDecodeError (a DataError) naming the image when it cannot be decoded."""
    return model_input(source, clip.preprocess, transform_size(clip.preprocess), name)


def encode_image_tensors(clip: ClipModel, images: torch.Tensor) -> np.ndarray:
    """Preprocessed images [n, 3, H, W] -> float32 [n, d], unit norm."""
    clip.model.eval()
    with torch.inference_mode(), autocast_for(clip.device, clip.inference_precision):
        features = clip.model.encode_image(images.to(clip.device, non_blocking=True))
    return _unit(features)


def _unit(features: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, in float32 (after a half-precision forward too): the one normalisation."""
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def encode_images(
    clip: ClipModel,
    sources: Sequence[ImageSource],
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    draft: bool = True,
    desc: str = "embed images",
    inputs: InputCache | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Embed images (files, bytes or PIL images). Returns (vectors [n_ok, d] float32, unit norm; indices of
    `sources` embedded). Images that cannot be decoded are skipped (logged); their indices are absent.

    `draft=False` decodes JPEGs in full (only to measure what draft decoding changes: embeddings stay within
    cosine 0.999, tests/test_fast_paths.py; 2-3x faster on photos, docs/performance.md). `inputs`: an
    InputCache of clip.preprocess that keeps the decoded, preprocessed images for the next call."""
    loader = DataLoader(
        ImageDataset(sources, clip.preprocess, transform_size(clip.preprocess) if draft else None, inputs),
        batch_size=batch_size,
        # what an InputCache keeps must live in this process: no worker processes (threads still decode)
        num_workers=0 if inputs is not None else default_num_workers(num_workers, clip.device),
        collate_fn=collate_skipping_bad,
        pin_memory=clip.device.type == "cuda",
    )
    # Each batch's vectors are copied into one array allocated up front, so nothing of a batch outlives it.
    # Keeping the batches' results instead (numpy views of small torch tensors, one per batch) made peak RSS
    # grow with the item count: with one 8 KiB block per batch left among the freed activation buffers, glibc
    # grew its heap instead of reusing the space around them, and could not return it (clip-tiny, 40,000
    # items: 2.9 GiB peak RSS, 0.2 GiB of the heap in use; 0.85 GiB and flat this way; docs/performance.md).
    vectors: np.ndarray | None = None
    n, kept = 0, []
    for batch, _ in show_progress(loader, desc, unit="batch", enabled=progress):
        if batch is not None:
            images, idx = batch
            features = encode_image_tensors(clip, images)
            if vectors is None:
                vectors = np.empty((len(sources), features.shape[1]), np.float32)
            vectors[n : n + len(features)] = features
            n += len(features)
            kept += idx.tolist()
    if vectors is None:
        return np.zeros((0, clip.embed_dim), np.float32), kept
    return (vectors if n == len(vectors) else vectors[:n].copy()), kept  # skipped images: no unused rows kept


def encode_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 256, progress: bool = False,
                 desc: str = "embed texts") -> np.ndarray:
    """Embed texts: float32 [n, d], unit norm. Captions longer than the context are truncated (and cut before
    tokenizing to a bounded length: inputs.cap_captions)."""
    out: np.ndarray | None = None
    context = (clip.model_cfg.get("text_cfg") or {}).get("context_length")
    clip.model.eval()
    with torch.inference_mode(), autocast_for(clip.device, clip.inference_precision):
        for start in show_progress(range(0, len(texts), batch_size), desc, unit="batch", enabled=progress):
            tokens = clip.tokenizer(cap_captions(texts[start : start + batch_size], context))
            # cut after the batch's last end-of-text token where that changes nothing (model/text_trim.py)
            tokens = text_trim.trim_tokens(clip.model, tokens).to(clip.device)
            features = _unit(text_trim.encode_text(clip.model, tokens))
            if out is None:  # copied into one array, as in encode_images (no per-batch tensor kept alive)
                out = np.empty((len(texts), features.shape[1]), np.float32)
            out[start : start + len(features)] = features
    return out if out is not None else np.zeros((0, clip.embed_dim), np.float32)


def encode_items(
    clip: ClipModel,
    kind: str,
    items: Sequence[str],
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[list[str], np.ndarray, list[str]]:
    """Embed image paths (kind "images") or texts ("texts"): (ids embedded, vectors, images skipped).

    Images that cannot be decoded are left out of ids and vectors, listed in the third value and logged.
    """
    if kind == "texts":
        return list(items), encode_texts(clip, items, batch_size, progress=progress), []
    if kind != "images":
        raise ValueError(f"kind {kind!r}: 'images' or 'texts'")
    vectors, kept = encode_images(clip, items, batch_size, num_workers, progress=progress)
    kept_set = set(kept)
    skipped = [p for i, p in enumerate(items) if i not in kept_set]
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped", len(skipped), len(items))
    return [items[i] for i in kept], vectors, skipped
