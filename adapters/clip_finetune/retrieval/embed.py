"""Batched, L2-normalised embedding of images and texts, and the embeddings file format.

Embeddings files: `.npz` with `ids` (str, [n]) and `vectors` (float32, [n, d]) for numpy
(`np.load(f)["vectors"]`), or `.parquet` (columns `id`, `vector`) for pandas (`pd.read_parquet(f)`).
A sharded embedding writes a folder of such parts and an index.json (shards.py); load_embeddings joins them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import ImageDataset, collate_skipping_bad, default_num_workers
from ..data.decode_cache import transform_size
from ..errors import DataError
from ..model.clip import ClipModel

log = logging.getLogger(__name__)


def autocast_for(device: torch.device, precision: str = "auto"):
    """Mixed-precision context: bf16 (or fp16) autocast on CUDA, nothing on CPU or with fp32."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cuda", dtype=torch.bfloat16)


def encode_image_tensors(clip: ClipModel, images: torch.Tensor) -> np.ndarray:
    """Preprocessed images [n, 3, H, W] -> float32 [n, d], unit norm."""
    clip.model.eval()
    with torch.inference_mode(), autocast_for(clip.device):
        features = clip.model.encode_image(images.to(clip.device, non_blocking=True), normalize=True)
    return features.float().cpu().numpy()


def encode_images(
    clip: ClipModel,
    paths: Sequence[str],
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    draft: bool = True,
) -> tuple[np.ndarray, list[int]]:
    """Embed image files. Returns (vectors [n_ok, d] float32, unit norm; indices of `paths` embedded).

    Images that cannot be decoded are skipped (logged); their indices are absent from the result.
    `draft`: decode JPEGs at reduced scale, never below the model's input size (embeddings stay within
    cosine 0.999 of a full decode, tests/test_fast_paths.py; 2-3x faster on photos, docs/performance.md).
    """
    loader = DataLoader(
        ImageDataset(paths, clip.preprocess, transform_size(clip.preprocess) if draft else None),
        batch_size=batch_size,
        num_workers=default_num_workers(num_workers, clip.device),
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
    for batch, _ in tqdm(loader, desc="embed images", unit="batch", disable=not progress):
        if batch is not None:
            images, idx = batch
            features = encode_image_tensors(clip, images)
            if vectors is None:
                vectors = np.empty((len(paths), features.shape[1]), np.float32)
            vectors[n : n + len(features)] = features
            n += len(features)
            kept += idx.tolist()
    if vectors is None:
        return np.zeros((0, clip.embed_dim), np.float32), kept
    return (vectors if n == len(vectors) else vectors[:n].copy()), kept  # skipped images: no unused rows kept


def encode_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Embed texts: float32 [n, d], unit norm. Captions longer than the context are truncated."""
    out: np.ndarray | None = None
    clip.model.eval()
    with torch.inference_mode(), autocast_for(clip.device):
        for start in tqdm(range(0, len(texts), batch_size), desc="embed texts", disable=not progress):
            tokens = clip.tokenizer(list(texts[start : start + batch_size])).to(clip.device)
            features = clip.model.encode_text(tokens, normalize=True).float().cpu()
            if out is None:  # copied into one array, as in encode_images (no per-batch tensor kept alive)
                out = np.empty((len(texts), features.shape[1]), np.float32)
            out[start : start + len(features)] = features.numpy()
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
        return list(items), encode_texts(clip, items, batch_size), []
    if kind != "images":
        raise ValueError(f"kind {kind!r}: 'images' or 'texts'")
    vectors, kept = encode_images(clip, items, batch_size, num_workers, progress=progress)
    kept_set = set(kept)
    skipped = [p for i, p in enumerate(items) if i not in kept_set]
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped", len(skipped), len(items))
    return [items[i] for i in kept], vectors, skipped


def save_embeddings(path: str | Path, ids: Sequence[str], vectors: np.ndarray) -> Path:
    """Write ids + vectors as .npz (numpy) or .parquet (pandas; needs pyarrow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise DataError("writing .parquet needs pandas and pyarrow: pip install pandas pyarrow") from None
        pd.DataFrame({"id": list(ids), "vector": list(vectors)}).to_parquet(path)
    elif path.suffix == ".npz":
        np.savez(path, ids=np.asarray(list(ids), dtype=str), vectors=vectors)
    else:
        raise DataError(f"embeddings file {str(path)!r}: use a .npz (numpy) or .parquet (pandas) name")
    return path


def load_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read an embeddings file written by save_embeddings: (ids, vectors [n, d] float32).

    A sharded-embeddings folder (or its index.json) is joined in input order; a missing part is an error.
    """
    path = Path(path)
    if path.is_dir() or path.name == "index.json":
        from .shards import load_sharded

        return load_sharded(path)
    if not path.is_file():
        raise DataError(f"embeddings file {str(path)!r} does not exist; create it with `clip-finetune embed`")
    if path.suffix == ".parquet":
        import pandas as pd

        df = pd.read_parquet(path)
        return df["id"].astype(str).tolist(), np.stack(df["vector"].to_numpy()).astype(np.float32)
    with np.load(path, allow_pickle=False) as data:
        return data["ids"].tolist(), data["vectors"].astype(np.float32)
