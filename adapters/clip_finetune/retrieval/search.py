"""Search over embeddings: exact top-k by cosine similarity (vectors are unit norm), text queries against an
index, and hybrid search that fuses an item's text and image similarities.

Hybrid search, and why it z-scores: jina-clip-v1's model card: text-text cosine similarities sit on a
different scale from text-image ones (CLIP text-image cosines cluster low and narrow, text-text ones higher),
so a plain sum lets whichever list spreads wider decide the order. Two fusions, over each query's candidates:

* weighted sum:  fused = alpha * text_score + beta * image_score            (raw cosines)
* z-score:       fused = alpha * z(text_scores) + beta * z(image_scores),   z(s) = (s - mean(s)) / std(s)

alpha weighs the query's similarity to the item's text, beta to its image; beta defaults to 1 - alpha.
Measured in docs/search.md (bench/hybrid_search.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from ..model.clip import ClipModel


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k highest scores of each row, best first: ([q, k], [q, k])."""
    scores = np.atleast_2d(scores)
    k = min(k, scores.shape[1])
    if k <= 0:
        empty = np.zeros((scores.shape[0], 0))
        return empty.astype(np.int64), empty
    # argpartition finds the top k in O(n); only those k are then sorted (stable: ties keep item order)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part.sort(axis=1)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(scores, idx, axis=1)


def search_texts(
    clip: ClipModel, ids: Sequence[str], vectors: np.ndarray, queries: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-k (id, score) of the indexed items for each text query."""
    from .embed import encode_texts  # torch and open_clip only where a model embeds

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"k must be a whole number of results, at least 1 (got {k!r})")
    if vectors.shape[1] != clip.embed_dim:
        raise DataError(
            f"the index holds {vectors.shape[1]}-d vectors but the model embeds {clip.embed_dim}-d; "
            "embed the items again with this model"
        )
    idx, scores = top_k(encode_texts(clip, list(queries)) @ vectors.T, k)  # [n_queries, n_items] cosines
    return [
        [(ids[i], float(s)) for i, s in zip(row_i, row_s, strict=True)]
        for row_i, row_s in zip(idx, scores, strict=True)
    ]


# --- hybrid search -----------------------------------------------------------------------------------------


Method = Literal["weighted", "zscore"]
METHODS: tuple[str, ...] = ("weighted", "zscore")


def zscore(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """(s - mean) / std along `axis` (population std); a constant list (std 0) becomes all zeros, not NaN."""
    s = np.asarray(scores, dtype=np.float64)
    mean = s.mean(axis=axis, keepdims=True)
    std = s.std(axis=axis, keepdims=True)
    centred = s - mean
    # std == 0: every candidate scores the same, so the list carries no ranking signal; 0 adds none
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def _weights(alpha: float, beta: float | None) -> tuple[float, float]:
    beta = 1.0 - alpha if beta is None else beta
    if alpha < 0 or beta < 0 or alpha + beta == 0:
        raise ValueError(f"alpha and beta must be >= 0 and not both 0 (got alpha={alpha}, beta={beta})")
    return float(alpha), float(beta)


def weighted_sum(
    text_scores: np.ndarray, image_scores: np.ndarray, alpha: float = 0.5, beta: float | None = None
) -> np.ndarray:
    """alpha * text_scores + beta * image_scores (same shape, e.g. [n_queries, n_items])."""
    a, b = _weights(alpha, beta)
    t, i = np.asarray(text_scores, dtype=np.float64), np.asarray(image_scores, dtype=np.float64)
    if t.shape != i.shape:
        raise ValueError(f"text and image scores differ in shape ({t.shape} vs {i.shape})")
    return a * t + b * i


def zscore_fusion(
    text_scores: np.ndarray, image_scores: np.ndarray, alpha: float = 0.5, beta: float | None = None
) -> np.ndarray:
    """Weighted sum of the two score lists after z-scoring each over its candidates (the last axis)."""
    return weighted_sum(zscore(text_scores), zscore(image_scores), alpha, beta)


def fuse(
    text_scores: np.ndarray,
    image_scores: np.ndarray,
    method: Method = "zscore",
    alpha: float = 0.5,
    beta: float | None = None,
) -> np.ndarray:
    """Fused scores by `method` ('weighted' or 'zscore'); higher is better."""
    if method == "weighted":
        return weighted_sum(text_scores, image_scores, alpha, beta)
    if method == "zscore":
        return zscore_fusion(text_scores, image_scores, alpha, beta)
    raise ValueError(f"unknown fusion method {method!r}; use one of {', '.join(METHODS)}")


def hybrid_top_k(
    query_vectors: np.ndarray,
    text_vectors: np.ndarray,
    image_vectors: np.ndarray,
    k: int = 5,
    method: Method = "zscore",
    alpha: float = 0.5,
    beta: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items for text queries, fusing similarity to each item's text and to its image.

    query_vectors [q, d] (text tower), text_vectors [n, d] (item descriptions, text tower) and
    image_vectors [n, d] (item images, vision tower), all unit norm; row j of both describes item j.
    Returns (indices [q, k], fused scores [q, k]).
    """
    if text_vectors.shape != image_vectors.shape:
        raise ValueError(f"item text and image vectors differ in shape ({text_vectors.shape} vs "
                         f"{image_vectors.shape}); row j of both must be item j")
    text_scores = query_vectors @ text_vectors.T  # [q, n] text-text cosine
    image_scores = query_vectors @ image_vectors.T  # [q, n] text-image cosine
    return top_k(fuse(text_scores, image_scores, method, alpha, beta), k)
