"""Text search over an index of image (or text) vectors: the queries embedded by the model, the index ranks
(exact_index.ExactIndex, or any Index: index.open_index picks the one on disk).

Hybrid search (fusing an item's description with its image) is not offered: measured on held-out items it did
not beat image-only search (docs/search.md); the fusion the measurement used lives with it (bench/fusion.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import DataError
from .index import Index

if TYPE_CHECKING:
    from ..model.clip import ClipModel


def search_texts(clip: ClipModel, index: Index, queries: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (id, score) of the indexed items for each text query, best first."""
    from .embed import encode_texts  # torch and open_clip only where a model embeds

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"k must be a whole number of results, at least 1 (got {k!r})")
    if index.dim != clip.embed_dim:
        raise DataError(
            f"the index holds {index.dim}-d vectors but the model embeds {clip.embed_dim}-d; "
            "embed the items again with this model"
        )
    ids, scores = index.search(encode_texts(clip, list(queries)), k)
    return [[(i, float(s)) for i, s in zip(row_i, row_s, strict=True)]
            for row_i, row_s in zip(ids, scores, strict=True)]
