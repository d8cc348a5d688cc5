"""The `Index` interface every search goes through: the exact index (every stored vector scored) and the
approximate ones (candidates from an ANN library, re-ranked with exact scores) are interchangeable.

Vectors are unit norm float32, so a score is a cosine similarity; higher is better, best first.
`meta` is the provenance of the vectors (provenance.made_by: kind 'images' or 'texts', the model and its
weights' hash); None when nothing was recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Index(Protocol):
    """What an index of embeddings offers; `kind` names the implementation in messages ("exact", ...)."""

    kind: str
    meta: dict[str, Any] | None

    @property
    def dim(self) -> int:
        """The vectors' width."""
        ...

    def __len__(self) -> int: ...

    def ids(self) -> list[str]:
        """The stored ids, in storage order."""
        ...

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors [n, dim] under ids; an id already stored is replaced (no duplicates)."""
        ...

    def remove(self, ids: Sequence[str]) -> int:
        """Drop these ids; returns how many were stored (unknown ids are ignored)."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """For each query [q, dim]: the ids of the k best items and their scores [q, min(k, len)], best first."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write the index (atomically) and return the path written."""
        ...
