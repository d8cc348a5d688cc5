"""The exact index: every stored vector scored against every query (ranking.top_k_by_dot), over an embeddings
store (store.py). Exact and simple up to about a hundred thousand vectors; an approximate index implements the
same `Index` protocol (index.py) for more.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .ranking import top_k_by_dot
from .store import Embeddings, read_embeddings, save_embeddings


class ExactIndex:
    """Ids and unit vectors in memory; `meta`: who made the vectors (provenance.made_by), or None."""

    kind = "exact"

    def __init__(self, dim: int, meta: dict[str, Any] | None = None, source: str = "") -> None:
        self._dim = int(dim)
        self.meta = meta
        self.source = source  # where it was loaded from, for messages
        self._ids: list[str] = []
        self._vectors = np.zeros((0, self._dim), np.float32)
        self._row: dict[str, int] = {}

    @classmethod
    def from_embeddings(cls, emb: Embeddings, source: str = "") -> ExactIndex:
        index = cls(emb.dim, emb.meta, source)
        index.add(emb.ids, emb.vectors)
        return index

    @classmethod
    def load(cls, path: str | Path) -> ExactIndex:
        """An embeddings .npz, .parquet or sharded folder (store.read_embeddings checks it)."""
        return cls.from_embeddings(read_embeddings(path), str(path))

    @property
    def dim(self) -> int:
        return self._dim

    def describe(self) -> str:
        """One line for people: what answered a search."""
        return f"exact index ({len(self):,} vectors, every one scored)"

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def vectors(self) -> np.ndarray:
        """The stored vectors [n, dim], in the order of ids() (read-only view)."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors under ids: an id already stored keeps its place and gets the new vector; new ids are
        appended in order; an id given twice keeps its last vector."""
        vectors = np.asarray(vectors, dtype=np.float32)
        ids = [str(i) for i in ids]
        if vectors.ndim != 2 or vectors.shape[1] != self._dim or len(vectors) != len(ids):
            raise DataError(f"index add: {len(ids)} ids and vectors of shape {vectors.shape}; need one "
                            f"{self._dim}-d vector per id (this index holds {self._dim}-d vectors)")
        if not np.isfinite(vectors).all():
            raise DataError("index add: vectors hold NaN or infinity; they would rank at random")
        last = {item: i for i, item in enumerate(ids)}  # an id given twice: its last vector
        new = [item for item in last if item not in self._row]
        grown = np.empty((len(self._ids) + len(new), self._dim), np.float32)
        grown[: len(self._ids)] = self._vectors
        for item in new:
            self._row[item] = len(self._ids)
            self._ids.append(item)
        rows = np.fromiter((self._row[item] for item in last), np.int64, len(last))
        grown[rows] = vectors[list(last.values())]
        self._vectors = grown

    def remove(self, ids: Sequence[str]) -> int:
        """Drop these ids (unknown ones are ignored); the others keep their order. Returns how many were stored."""
        gone = {str(i) for i in ids} & self._row.keys()
        if gone:
            keep = [r for r, item in enumerate(self._ids) if item not in gone]
            self._ids = [self._ids[r] for r in keep]
            self._vectors = self._vectors[keep]
            self._row = {item: r for r, item in enumerate(self._ids)}
        return len(gone)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """The k best ids of each query [q, dim] by cosine, best first, with their scores [q, min(k, len)]."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self._dim:
            raise DataError(f"the index {self.source!r} holds {self._dim}-d vectors, the queries are "
                            f"{queries.shape[1]}-d; embed the items again with the model that embeds the queries")
        idx, scores = top_k_by_dot(queries, self._vectors, k)
        return [[self._ids[i] for i in row] for row in idx.tolist()], scores

    def save(self, path: str | Path) -> Path:
        """Write as an embeddings .npz or .parquet (atomically), readable by np.load / pandas as before."""
        return save_embeddings(path, self._ids, self._vectors, self.meta)
