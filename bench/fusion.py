"""Score fusion of two candidate lists (an item's description and its image) for bench/hybrid_search.py.

Not part of the package: measured there, fusion did not beat image-only search (docs/search.md), so search does
not offer it. Kept here so the measurement can be repeated on other data.

Why z-scores: jina-clip-v1's model card: text-text cosine similarities sit on a different scale from text-image
ones (CLIP text-image cosines cluster low and narrow, text-text ones higher), so a plain sum lets whichever list
spreads wider decide the order. Two fusions, over each query's candidates:

* weighted sum:  fused = alpha * text_score + beta * image_score            (raw cosines)
* z-score:       fused = alpha * z(text_scores) + beta * z(image_scores),   z(s) = (s - mean(s)) / std(s)

alpha weighs the query's similarity to the item's text, beta to its image; beta defaults to 1 - alpha.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

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
