"""The `Index` interface every search goes through: the exact index (every stored vector scored) and the
approximate ones (candidates from an ANN library, re-ranked with exact scores) are interchangeable.

Vectors are unit norm float32, so a score is a cosine similarity; higher is better, best first.
`meta` is the provenance of the vectors (provenance.made_by: kind 'images' or 'texts', the model and its
weights' hash); None when nothing was recorded. provenance.check_index refuses an index another model made.
open_index(path) opens whichever implementation is on disk (exact_index.ExactIndex for an embeddings store).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
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

    def describe(self) -> str:
        """One line for people naming the implementation, e.g. "exact index (1,000 vectors, every one scored)"."""
        ...

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

    # Loading is open_index(path) below: it picks the implementation from what is on disk (ExactIndex.load,
    # ann.open_ann), so a class need not offer a `load` of its own to be an Index.


# --- opening an index from what is on disk ------------------------------------------------------------------

# Index implementations besides the exact one register here: (kind, claims(path) -> bool, load(path) -> Index).
# open_index asks each, in order, whether the path is theirs; anything no one claims is an embeddings store
# (.npz, .parquet, sharded folder), opened as the exact index.
_OPENERS: list[tuple[str, Callable[[Path], bool], Callable[[Path], Index]]] = []
# implementations in modules of this package, imported by open_index when present:
# module -> (its function saying whether a path is its index, its function opening one)
PLUGINS = {"ann": ("is_ann_index", "open_ann"), "scann_index": ("is_scann_index", "open_scann")}


def register(kind: str, claims: Callable[[Path], bool], load: Callable[[Path], Index]) -> None:
    """Make open_index open the paths `claims` accepts with `load` (an implementation calls this at import)."""
    _OPENERS[:] = [o for o in _OPENERS if o[0] != kind] + [(kind, claims, load)]


def open_index(path: str | Path) -> Index:
    """The index stored at `path`, of whichever kind is there: a registered implementation's files, else an
    embeddings file or sharded folder as the exact index (a DataError names a missing or damaged file)."""
    path = Path(path)
    for name, (claims_name, load_name) in PLUGINS.items():
        if name not in (kind for kind, _, _ in _OPENERS) and importlib.util.find_spec(f"{__package__}.{name}"):
            module = importlib.import_module(f"{__package__}.{name}")
            if hasattr(module, claims_name) and hasattr(module, load_name):
                register(name, getattr(module, claims_name), getattr(module, load_name))
    for _, claims, load in _OPENERS:
        if claims(path):
            return load(path)
    from .exact_index import ExactIndex

    return ExactIndex.load(path)
