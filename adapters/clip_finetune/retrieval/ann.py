"""The approximate index: an HNSW graph (usearch) proposes candidates from compressed vectors, and the candidates
are re-ranked with exact cosines from the full float32 vectors, so a result's score is the exact index's score.

Why re-rank: text queries sit off the image cloud (the modality gap), where compressed distances lose most
(clip-retrieval #76); scoring `candidates` of them exactly restores recall for a few dot products a query.
Why usearch: measured against FAISS and hnswlib in docs/performance.md (python -m bench.search); it keeps int8
and float16 graphs, removes vectors without a rebuild, and saves to one file.

An index folder holds
  ann.json                the manifest: format, settings, dim, provenance `meta`, and the data files' names
  graph-G.usearch         the HNSW graph and its compressed vectors (usearch's own format); key = row number
  vectors-G.npy           the full vectors [rows, dim] float32, memory-mapped when opened (the re-rank reads
                          only the candidates' rows)
  rows-G.npz              `ids` [rows] and `alive` [rows]: a removed item keeps its row until the next build
G is the save's generation: the data files are written first, ann.json last (files.atomic_write), so a reader
sees the old index or the new one, never a mix; files of older generations are deleted after.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, Setting
from ..files import atomic_write, read_json, require_writable
from ..inputs import Unreadable
from ..progress import progress
from .index import Index
from .ranking import top_k
from .safe_npz import load_npz

FORMAT = "clip-finetune ann index v1"
MANIFEST = "ann.json"
STORAGES = ("i8", "f16", "f32")  # what the graph keeps of each vector: 1, 2 or 4 bytes a dimension
INSTALL_HINT = 'the approximate index needs usearch: pip install -e ".[index]" (or pip install usearch)'
GENERATION_FILE = re.compile(r"^(graph-[0-9a-f]{8}\.usearch|vectors-[0-9a-f]{8}\.npy|rows-[0-9a-f]{8}\.npz)$")
RERANK_BLOCK = 16  # queries re-ranked together: 16 x 100 candidates x 512-d float32 is 3 MB
BUILD_CHUNK = 65_536  # vectors a graph.add call links (in parallel); progress is shown per chunk
REBUILD = "build it again with {index}"  # {index}: each face says how (the CLI: `clip-finetune index --method ...`)
ADVICE = {"index": Setting("index", "method hnsw", "build_ann(ids, vectors) from the embeddings")}


def index_error(message: str, advice: dict[str, Setting]) -> DataError:
    """DataError: what is wrong with a saved index, then how to build it again (`advice`: this kind of index's)."""
    return DataError(f"{message}; {REBUILD}", advice=advice)


@dataclass(frozen=True)
class AnnSettings:
    """How the graph is built and searched. Defaults picked by python -m bench.search (docs/performance.md):
    recall@10 0.993 against brute force on 100k CLIP-like vectors with text-like queries, 0.906 at 1M (where the
    default index, scann_index.py, keeps 0.99)."""

    storage: str = "i8"
    connectivity: int = 16  # HNSW's M: edges per node; memory grows with it, recall too
    expansion_add: int = 128  # candidates kept while linking a new vector (build quality)
    expansion_search: int = 512  # candidates kept while walking the graph: text queries sit off the image
    # cloud, where HNSW needs a wide walk (100k vectors, bench.search: recall@10 0.977 at 256, 0.993 at 512)
    candidates: int = 100  # re-ranked exactly per query (at least k)

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise DataError(f"index storage {self.storage!r}: use one of {', '.join(STORAGES)}")
        small = {k: v for k, v in asdict(self).items() if k != "storage" and (not isinstance(v, int) or v < 1)}
        if small:
            raise DataError(f"index settings {small}: each must be a whole number >= 1")


def _usearch() -> Any:
    # ScaNN's extension must load before usearch's: the other way round, a ScaNN index built or opened later in the
    # same process crashes (segmentation fault; scann 1.4.2, usearch 2.26.6, measured; tests/test_scann_index.py
    # checks the two in one process)
    with contextlib.suppress(ImportError):
        from scann.scann_ops.py import scann_ops_pybind  # noqa: F401
    try:
        from usearch import index as usearch_index
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    return usearch_index


class RerankedIndex:
    """What both approximate indexes (this one and scann_index.ScannIndex) share: the full vectors in rows
    (`_vectors`, the first `_rows` used), each row's id (`_row_ids`, None where removed; `_row_of`: id -> row),
    and a search whose candidate rows, proposed by the subclass's `_reranked`, are re-ranked exactly."""

    kind = "approximate"
    settings: Any  # its `candidates`: how many rows a query re-ranks (at least k)
    _vectors: np.ndarray
    _row_ids: list[str | None]
    _row_of: dict[str, int]

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    def __len__(self) -> int:
        return len(self._row_of)

    def ids(self) -> list[str]:
        return [i for i in self._row_ids if i is not None]

    def search(self, queries: np.ndarray, k: int, threads: int = 0) -> tuple[list[list[str]], np.ndarray]:
        """Top-k ids and exact cosines per query [q, dim]; `threads` 0 uses every core."""
        queries = checked_queries(queries, self.dim)
        wanted = min(max(k, self.settings.candidates), len(self))
        if wanted == 0 or k < 1:
            return [[] for _ in queries], np.zeros((len(queries), 0), np.float32)
        rows, scores = self._reranked(queries, wanted, k, threads)
        return [[self._row_ids[r] for r in row if r >= 0] for row in rows.tolist()], scores

    def _reranked(self, queries: np.ndarray, wanted: int, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's `wanted` candidates re-ranked (`rerank`): rows [q, k'] (-1: padding) and scores."""
        raise NotImplementedError


class AnnIndex(RerankedIndex):
    """Approximate nearest neighbours with exact re-ranking; implements retrieval.index.Index."""

    def __init__(self, dim: int, meta: dict[str, Any] | None = None, settings: AnnSettings | None = None) -> None:
        self.settings = settings or AnnSettings()
        self.meta = meta
        self._vectors = np.zeros((0, dim), np.float32)  # rows 0.._rows-1 are used; the rest is room to grow
        self._rows = 0
        self._row_ids: list[str | None] = []  # None: removed
        self._row_of: dict[str, int] = {}
        s = self.settings
        # inner product of unit vectors is the cosine; usearch's "cos" would normalise again for nothing
        self._graph = _usearch().Index(ndim=dim, metric="ip", dtype=s.storage, connectivity=s.connectivity,
                                       expansion_add=s.expansion_add, expansion_search=s.expansion_search)

    def describe(self) -> str:
        """One line for people: what answered a search."""
        s = self.settings
        return (f"approximate index (usearch HNSW, {s.storage} graph, M={s.connectivity}, {len(self):,} vectors; "
                f"top {s.candidates} candidates re-ranked with exact scores)")

    def add(self, ids: Sequence[str], vectors: np.ndarray, threads: int = 0) -> None:
        """Index.add; `threads` link the new vectors in parallel (0: one a core)."""
        ids, vectors = checked_additions(ids, vectors, self.dim)
        self.remove(ids)  # replacing: the old row is dropped from the graph, the new one appended
        rows = np.arange(self._rows, self._rows + len(ids), dtype=np.uint64)
        self._vectors = with_room(self._vectors, self._rows, self._rows + len(ids))
        self._vectors[self._rows:self._rows + len(ids)] = vectors
        self._rows += len(ids)
        for item, row in zip(ids, rows.tolist(), strict=True):
            self._row_ids.append(item)
            self._row_of[item] = row
        if len(ids):
            self._graph.add(rows, vectors, threads=threads)

    def remove(self, ids: Sequence[str]) -> int:
        rows = [self._row_of.pop(str(i)) for i in ids if str(i) in self._row_of]
        for row in rows:
            self._row_ids[row] = None
        if rows:
            self._graph.remove(np.asarray(rows, dtype=np.uint64))
        return len(rows)

    def _reranked(self, queries: np.ndarray, wanted: int, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        found = self._graph.search(queries, wanted, threads=threads)
        keys = np.asarray(found.keys, dtype=np.int64).reshape(len(queries), -1)  # [q, c] rows
        # one query comes back as usearch's Matches (its keys are the found ones), several as BatchMatches
        counts = np.asarray(getattr(found, "counts", [keys.shape[1]])).reshape(len(queries))
        return rerank(self._vectors, queries, keys, counts, k)

    def save(self, path: str | Path) -> Path:
        folder = Path(path)
        require_writable(folder, "index folder")
        folder.mkdir(parents=True, exist_ok=True)
        gen = secrets.token_hex(4)
        names = {"graph": f"graph-{gen}.usearch", "vectors": f"vectors-{gen}.npy", "rows": f"rows-{gen}.npz"}
        atomic_write(folder / names["graph"], lambda tmp: self._graph.save(str(tmp)))
        atomic_write(folder / names["vectors"], lambda tmp: _save_npy(tmp, self._vectors[:self._rows]))
        alive = np.asarray([i is not None for i in self._row_ids], dtype=bool)
        row_ids = np.asarray([i or "" for i in self._row_ids], dtype=str)
        atomic_write(folder / names["rows"], lambda tmp: _save_npz(tmp, ids=row_ids, alive=alive))
        manifest = {"format": FORMAT, "library": "usearch", "dim": self.dim, "count": len(self), "rows": self._rows,
                    "settings": asdict(self.settings), "meta": self.meta, "files": names}
        text = json.dumps(manifest, indent=2)
        atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        for old in folder.iterdir():  # earlier generations: no manifest names them any more
            if GENERATION_FILE.match(old.name) and old.name not in names.values():
                old.unlink(missing_ok=True)
        return folder


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array)


def _save_npz(tmp: Path, **arrays: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def checked_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Index.search's queries as float32 rows [q, dim] (one query may come as a vector); DataError otherwise."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if queries.shape[1] != dim:
        raise DataError(f"queries of {queries.shape[1]} dimensions against an index of {dim}-d vectors")
    return queries


def with_room(vectors: np.ndarray, rows: int, need: int) -> np.ndarray:
    """`vectors` (its first `rows` in use) with room for `need` rows: itself where it has it, else a writable copy
    doubling (amortised O(1) a row); a memory-mapped file becomes an array."""
    if need <= len(vectors) and vectors.flags.writeable:
        return vectors
    grown = np.zeros((max(need, 2 * rows, 1024), vectors.shape[1]), np.float32)
    grown[:rows] = vectors[:rows]
    return grown


def checked_additions(ids: Sequence[str], vectors: np.ndarray, dim: int) -> tuple[list[str], np.ndarray]:
    """What Index.add may add: ids as strings, vectors [len(ids), dim] float32 and finite (DataError otherwise);
    an id given twice in one call keeps its later vector."""
    ids = [str(i) for i in ids]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape != (len(ids), dim):
        raise DataError(f"adding {len(ids)} ids with vectors of shape {vectors.shape}: need [{len(ids)}, "
                        f"{dim}] (this index holds {dim}-d vectors)")
    if not np.isfinite(vectors).all():
        raise DataError("adding vectors that hold NaN or infinity: they would rank at random; embed them again")
    last = {item: n for n, item in enumerate(ids)}
    keep = sorted(last.values())
    return [ids[n] for n in keep], vectors[keep]


def rerank(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray, counts: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidate rows [q, c] (the first counts[i] valid) by exact cosine with the full
    vectors: (rows [q, k'], scores [q, k']), k' = min(k, c); a query with fewer candidates pads with row -1."""
    valid = np.arange(rows.shape[1])[None, :] < counts[:, None]
    safe = np.where(valid, rows, 0)
    scores = np.empty(rows.shape, np.float32)
    for s in range(0, len(rows), RERANK_BLOCK):  # [block, c, dim] at a time: stays in the CPU's cache
        gathered = vectors[safe[s:s + RERANK_BLOCK].reshape(-1)].reshape(*safe[s:s + RERANK_BLOCK].shape, -1)
        scores[s:s + RERANK_BLOCK] = np.einsum("qcd,qd->qc", gathered, queries[s:s + RERANK_BLOCK])  # exact cosines
    scores = np.where(valid, scores, -np.inf)
    best, best_scores = top_k(scores, k)
    picked = np.take_along_axis(safe, best, axis=1)
    picked = np.where(np.isfinite(best_scores), picked, -1)
    return picked, best_scores.astype(np.float32)


def is_ann_index(path: str | Path) -> bool:
    """Whether `path` is a folder this module wrote (its manifest is there)."""
    return (Path(path) / MANIFEST).is_file()


def open_ann(path: str | Path, mmap: bool = True) -> AnnIndex:
    """The index saved in folder `path`; its full vectors memory-mapped (read on demand) unless `mmap` is False.
    DataError naming the folder for anything that is not a whole index of this format."""
    folder = Path(path)
    manifest = _manifest(folder)
    files = manifest["files"]
    try:
        index = AnnIndex(int(manifest["dim"]), manifest.get("meta"), AnnSettings(**manifest["settings"]))
        n = int(manifest["rows"])
    except (KeyError, TypeError, ValueError) as e:  # a manifest edited by hand or of another version
        raise index_error(f"{str(folder / MANIFEST)!r} is not a whole manifest ({type(e).__name__}: {e})",
                          ADVICE) from None
    graph = _usearch().Index.restore(str(folder / files["graph"]))
    if graph is None or graph.ndim != index.dim:
        raise index_error(f"{str(folder / files['graph'])!r} is not a usearch index of {index.dim}-d vectors", ADVICE)
    try:
        vectors = np.load(folder / files["vectors"], mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise index_error(f"{str(folder / files['vectors'])!r} is not readable ({e})", ADVICE) from None
    rows = load_npz(folder / files["rows"], ("ids", "alive"), hint=REBUILD, advice=ADVICE)
    if vectors.shape != (n, index.dim) or rows["ids"].shape != (n,) or rows["alive"].shape != (n,) or (
            int(rows["alive"].sum()) != len(graph)):
        raise index_error(f"the files of index {str(folder)!r} do not agree on its size ({n} rows)", ADVICE)
    graph.expansion_add, graph.expansion_search = index.settings.expansion_add, index.settings.expansion_search
    index._graph, index._vectors, index._rows = graph, vectors, n  # (usearch's file does not keep expansions)
    index._row_ids = [str(i) if a else None for i, a in zip(rows["ids"].tolist(), rows["alive"].tolist(), strict=True)]
    index._row_of = {i: r for r, i in enumerate(index._row_ids) if i is not None}
    return index


def _manifest(folder: Path) -> dict[str, Any]:
    if not (folder / MANIFEST).is_file():
        raise index_error(f"{str(folder)!r} holds no {MANIFEST}: not an index of this tool", ADVICE)
    try:
        manifest = read_json(folder / MANIFEST)
    except (DataError, Unreadable) as e:
        raise index_error(f"{str(folder / MANIFEST)!r} is not readable ({e})", ADVICE) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise index_error(f"{str(folder / MANIFEST)!r} is not a manifest of {FORMAT!r}", ADVICE)
    missing = [name for name in manifest["files"].values() if not (folder / str(name)).is_file()]
    if missing:
        raise index_error(f"index {str(folder)!r} is missing {', '.join(missing)}", ADVICE)
    return manifest


def build_ann(ids: Sequence[str], vectors: np.ndarray, meta: dict[str, Any] | None = None,
              settings: AnnSettings | None = None, show_progress: bool = False, threads: int = 0) -> AnnIndex:
    """An index of these vectors (e.g. a store's: retrieval/store.read_embeddings), added in chunks so a long build
    shows its progress."""
    index = AnnIndex(vectors.shape[1], meta, settings)
    index._vectors = with_room(index._vectors, 0, len(ids))  # one allocation for the store, not a doubling a chunk
    starts = range(0, len(ids), BUILD_CHUNK)
    for start in progress(starts, "indexing", unit="chunk", enabled=show_progress and len(starts) > 1):
        index.add(ids[start:start + BUILD_CHUNK], vectors[start:start + BUILD_CHUNK], threads)
    return index


def search_shards(indexes: Sequence[Index], queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    """Top-k over the shards of one collection (one index each, e.g. one per part of a sharded store, or per
    machine): each shard answers its own top k with exact cosines, which compare across shards, so the merged
    top k is what one index of everything would answer (up to each shard's recall). Scores [q, k'] pad with -inf
    where all shards together hold fewer than k items."""
    answers = [index.search(queries, k) for index in indexes]
    merged_ids, merged_scores = [], np.full((len(queries), k), -np.inf, np.float32)
    for q in range(len(queries)):
        pairs = sorted(((float(s), i) for ids, scores in answers for i, s in zip(ids[q], scores[q], strict=True)),
                       key=lambda pair: -pair[0])[:k]
        merged_ids.append([i for _, i in pairs])
        merged_scores[q, :len(pairs)] = [s for s, _ in pairs]
    return merged_ids, merged_scores
