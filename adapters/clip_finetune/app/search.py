"""Search: rank the vectors of an index (an embeddings file, a sharded folder or an approximate index's folder)
for text queries, with the model that made them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model.clip import ClipModel
    from ..retrieval.index import Index


def read_index(path: str | Path) -> Index:
    """The index at `path` (the kind what is on disk says), read before a model loads: a bad file fails first."""
    from ..retrieval.index import open_index

    return open_index(path)


def search(clip: ClipModel, index: Index, where: str | Path, queries: list[str], k: int,
           allow_mismatch: bool = False) -> list[list[tuple[str, float]]]:
    """The top-k (item, score) of `index` for each query; the index must be image vectors `clip` made (else
    refused, or with `allow_mismatch` searched with a warning)."""
    from ..retrieval.provenance import check_index
    from ..retrieval.search import search_texts

    check_index(index, str(where), clip, "images", allow=allow_mismatch)
    return search_texts(clip, index, queries, k)
