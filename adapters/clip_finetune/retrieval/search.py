"""Nearest-neighbour search over an embeddings file (exact cosine similarity; vectors are unit norm)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from ..model.clip import ClipModel
from .embed import encode_texts


def top_k(query_vectors: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k most similar rows of `vectors` for each query: ([q, k], [q, k])."""
    scores = query_vectors @ vectors.T  # [n_queries, n_items] cosine similarity
    k = min(k, vectors.shape[0])
    # argpartition finds the top k in O(n); only those k are then sorted
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(scores, idx, axis=1)


def search_texts(
    clip: ClipModel, ids: Sequence[str], vectors: np.ndarray, queries: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-k (id, score) of the indexed items for each text query."""
    if vectors.shape[1] != clip.embed_dim:
        raise DataError(
            f"the index holds {vectors.shape[1]}-d vectors but the model embeds {clip.embed_dim}-d; "
            "embed the items again with this model"
        )
    idx, scores = top_k(encode_texts(clip, list(queries)), vectors, k)
    return [
        [(ids[i], float(s)) for i, s in zip(row_i, row_s, strict=True)]
        for row_i, row_s in zip(idx, scores, strict=True)
    ]
