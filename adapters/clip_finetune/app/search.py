"""Search: rank the vectors of an embeddings file for text queries, with the model that made them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model.clip import ClipModel
    from ..retrieval.store import Embeddings


def read_index(path: str | Path) -> Embeddings:
    """The embeddings file (or sharded folder) at `path`, read before a model loads: a bad file fails first."""
    from ..retrieval.store import read_embeddings

    return read_embeddings(path)


def search(clip: ClipModel, index: Embeddings, where: str | Path, queries: list[str], k: int,
           allow_mismatch: bool = False) -> list[list[tuple[str, float]]]:
    """The top-k (item, score) of `index` for each query; the index must be image vectors `clip` made (else
    refused, or with `allow_mismatch` searched with a warning)."""
    from ..retrieval.provenance import check_index
    from ..retrieval.search import search_texts

    check_index(index, str(where), clip, "images", allow=allow_mismatch)
    return search_texts(clip, index.ids, index.vectors, queries, k)
