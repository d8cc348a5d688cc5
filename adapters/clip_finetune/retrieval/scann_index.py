"""The partitioned approximate index: ScaNN (Google's scann) splits the vectors into k-means leaves, scores the
leaves a query is nearest to with 4-bit anisotropic codes (score-aware quantisation), and its candidates are
re-ranked with exact cosines from the full float32 vectors, as in ann.py, so a result's score is the exact score.

Why it beside the HNSW graph (ann.py): text queries sit off the image cloud (the modality gap), where a greedy graph
walk misses a tenth of their true top 10 at a million vectors (docs/performance.md); scanning a fixed share of
the leaves with SIMD lookup tables keeps recall as the index grows, at less CPU a query (python -m bench.search).
ScaNN, not FAISS's IVF: at the same share of the data scanned FAISS's IVF-SQ8 costs ~3x the CPU, and its IVF
product quantisers lose the text queries' neighbours (docs/performance.md).

A folder holds
  scann.json          the manifest: format, settings, dim, provenance `meta`, and the data files' names
  scann-G/            ScaNN's own files (its serialize(); relative paths): partitions, codebook, codes
  vectors-G.npy       the full vectors [rows, dim] float32, memory-mapped when opened (the re-rank reads only
                      the candidates' rows)
  rows-G.npz          `ids` [rows], `alive` [rows], and `points` [ScaNN's points]: the row each point holds
G is the save's generation: the data is written first, scann.json last (files.atomic_write), so a reader sees the
old index or the new one; older generations are deleted after.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, Setting
from ..files import atomic_write, read_json, require_writable
from ..inputs import Unreadable
from .ann import REBUILD, RerankedIndex, _save_npy, _save_npz, checked_additions, index_error, rerank, with_room
from .safe_npz import load_npz

FORMAT = "clip-finetune scann index v1"
MANIFEST = "scann.json"
INSTALL_HINT = 'the partitioned index needs scann: pip install -e ".[index]" (or pip install scann)'
GENERATION = re.compile(r"^(scann-[0-9a-f]{8}|vectors-[0-9a-f]{8}\.npy|rows-[0-9a-f]{8}\.npz)$")
SMALL = 4096  # fewer vectors are scored one by one (ScaNN's brute force): too few to train leaves and codebooks
ADVICE = {"index": Setting("index", "method scann", "build_scann(ids, vectors) from the embeddings")}


@dataclass(frozen=True)
class ScannSettings:
    """How the index is trained and searched; defaults picked by python -m bench.search (docs/performance.md)."""

    leaves: int = 0  # k-means partitions; 0: about 4 sqrt(n), at least 50 vectors a leaf (set at build)
    search_share: float = 0.25  # the share of the leaves each query scores (nearest first): recall grows with it
    min_scored: int = 20_000  # ...and at least the leaves holding this many vectors (all of a small index): cheap
    # (4-bit codes), and a small index's leaves are few and coarse (8,000 vectors: 0.2 of them finds 0.95 of the top 10)
    candidates: int = 100  # re-ranked exactly per query (at least k)
    dims_per_block: int = 2  # dimensions a 4-bit code covers: 2 is 128 bytes a 512-d vector
    training_sample: int = 250_000  # vectors the partitions and codebooks are trained on

    def __post_init__(self) -> None:
        whole = {k: v for k, v in asdict(self).items() if k != "search_share" and (not isinstance(v, int) or v < 0)}
        if whole or not 0 < self.search_share <= 1 or self.candidates < 1 or self.dims_per_block < 1:
            raise DataError(f"scann index settings {asdict(self)}: whole numbers >= 1 (leaves >= 0) and a "
                            "search_share in (0, 1]")

    def leaves_for(self, n: int) -> int:
        """0 for an index of fewer than SMALL vectors: every vector scored exactly by ScaNN, no leaves."""
        return 0 if n < SMALL else self.leaves or max(2, min(round(4 * math.sqrt(n)), n // 50))


def _scann() -> Any:
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    return scann_ops_pybind


class ScannIndex(RerankedIndex):
    """Partitioned approximate search with exact re-ranking; implements retrieval.index.Index.
    Made by build_scann (ScaNN trains its partitions and codes on the vectors) or open_scann."""

    def __init__(self, searcher: Any, vectors: np.ndarray, row_ids: list[str | None], points: list[int],
                 meta: dict[str, Any] | None, settings: ScannSettings, leaves: int) -> None:
        self._searcher, self._vectors, self._rows = searcher, vectors, len(row_ids)
        self._row_ids = row_ids  # None: removed
        self._row_of = {i: r for r, i in enumerate(row_ids) if i is not None}
        self._points = points  # ScaNN's point p holds row _points[p]
        self._points_array: np.ndarray | None = None  # the same as an array, made again after a change
        self._point_of = {r: p for p, r in enumerate(points)}
        self.meta, self.settings, self.leaves = meta, settings, leaves

    def describe(self) -> str:
        how = (f"{self.leaves:,} leaves, {self._to_search()} scored a query, 4-bit anisotropic codes" if self.leaves
               else f"every vector scored: fewer than {SMALL:,} when built")
        return (f"approximate index (ScaNN, {how}, {len(self):,} vectors; top {self.settings.candidates} candidates "
                "re-ranked with exact scores)")

    def _to_search(self) -> int:
        """Leaves a query scores (-1: ScaNN's brute force, no leaves)."""
        if not self.leaves:
            return -1
        share = max(self.settings.search_share, self.settings.min_scored / max(1, len(self)))
        return max(1, min(self.leaves, math.ceil(share * self.leaves)))

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Index.add: new vectors are coded and put in their nearest leaf (the partitions are not retrained:
        rebuild after the collection changed a lot)."""
        ids, vectors = checked_additions(ids, vectors, self.dim)
        if not ids:
            return
        self.remove(ids)
        self._vectors = with_room(self._vectors, self._rows, self._rows + len(ids))
        rows = range(self._rows, self._rows + len(ids))
        self._vectors[rows.start:rows.stop] = vectors
        self._rows = rows.stop
        points = self._searcher.upsert([None] * len(ids), vectors, 256)
        for item, row, point in zip(ids, rows, points, strict=True):
            self._row_ids.append(item)
            self._row_of[item] = row
            self._point_of[row] = int(point)
            self._points.append(row)
            assert len(self._points) == int(point) + 1, "ScaNN appends new points"

    def remove(self, ids: Sequence[str]) -> int:
        """Index.remove. ScaNN moves its last point into a removed one's place, one at a time; mirrored here."""
        rows = [self._row_of.pop(str(i)) for i in ids if str(i) in self._row_of]
        points = []
        for row in rows:
            self._row_ids[row] = None
            point, moved = self._point_of.pop(row), self._points.pop()
            if moved != row:
                self._points[point] = moved
                self._point_of[moved] = point
            points.append(point)
        if points:
            self._searcher.delete(points)
            self._points_array = None
        return len(rows)

    def _reranked(self, queries: np.ndarray, wanted: int, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        from ..machine import cpu_cores

        if self._points_array is None or len(self._points_array) != len(self._points):
            self._points_array = np.asarray(self._points, dtype=np.int64)
        parts = np.array_split(queries, max(1, min(threads or cpu_cores(), len(queries))))
        if len(parts) == 1:
            return self._search_part(queries, wanted, k)
        # a thread a part, each scanning (ScaNN releases the GIL) and re-ranking (numpy too) its own queries:
        # both cores stay busy to the end, where ScaNN's own parallel batch left the re-rank on one (1M
        # vectors: 1,066 ms a 1,000-query batch in ScaNN's threads, ~890 ms in two of ours; docs/performance.md)
        with ThreadPoolExecutor(len(parts)) as pool:
            done = list(pool.map(lambda part: self._search_part(part, wanted, k), parts))
        return np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done])

    def _search_part(self, queries: np.ndarray, wanted: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ScaNN's candidates for these queries on this thread, re-ranked: rows [q, k'] and scores."""
        points, scores = self._searcher.search_batched(queries, wanted, wanted, self._to_search(), False, 256)
        points = np.asarray(points, dtype=np.int64).reshape(len(queries), -1)
        # a query whose leaves hold fewer than `wanted` gets fewer, best first, then point 0 with a NaN score
        counts = (~np.isnan(np.asarray(scores).reshape(points.shape))).sum(axis=1)
        return rerank(self._vectors, queries, self._points_array[points], counts, k)

    def save(self, path: str | Path) -> Path:
        folder = Path(path)
        require_writable(folder, "index folder")
        folder.mkdir(parents=True, exist_ok=True)
        gen = secrets.token_hex(4)
        names = {"scann": f"scann-{gen}", "vectors": f"vectors-{gen}.npy", "rows": f"rows-{gen}.npz"}
        staging = folder / f".{names['scann']}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        self._searcher.serialize(str(staging), True)
        staging.rename(folder / names["scann"])
        atomic_write(folder / names["vectors"], lambda tmp: _save_npy(tmp, self._vectors[:self._rows]))
        alive = np.asarray([i is not None for i in self._row_ids], dtype=bool)
        row_ids = np.asarray([i or "" for i in self._row_ids], dtype=str)
        points = np.asarray(self._points, dtype=np.int64)
        atomic_write(folder / names["rows"], lambda tmp: _save_npz(tmp, ids=row_ids, alive=alive, points=points))
        manifest = {"format": FORMAT, "library": "scann", "dim": self.dim, "count": len(self), "rows": self._rows,
                    "leaves": self.leaves, "settings": asdict(self.settings), "meta": self.meta, "files": names}
        text = json.dumps(manifest, indent=2)
        atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        for old in folder.iterdir():  # earlier generations: no manifest names them any more
            if GENERATION.match(old.name) and old.name not in names.values():
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        return folder


def _config(n: int, dim: int, settings: ScannSettings, leaves: int) -> str:
    builder = _scann().builder(np.zeros((1, dim), np.float32), settings.candidates, "dot_product")
    if not leaves:
        return builder.score_brute_force().create_config()
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=max(1, math.ceil(settings.search_share * leaves)),
                           training_sample_size=min(n, settings.training_sample))
    # anisotropic_quantization_threshold 0.2: ScaNN's own recommendation for unit vectors scored by dot product
    return builder.score_ah(settings.dims_per_block, anisotropic_quantization_threshold=0.2).create_config()


def build_scann(ids: Sequence[str], vectors: np.ndarray, meta: dict[str, Any] | None = None,
                settings: ScannSettings | None = None, threads: int = 0) -> ScannIndex:
    """An index of these vectors: ScaNN trains its leaves and codebooks on (a sample of) them."""
    settings = settings or ScannSettings()
    ids = [str(i) for i in ids]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(set(ids)) != len(ids):
        raise DataError("the ids to index repeat: each item needs one vector")
    if vectors.ndim != 2 or len(vectors) != len(ids) or not ids:
        raise DataError(f"indexing {len(ids)} ids with vectors of shape {vectors.shape}: need at least one "
                        "vector [dim] each")
    if vectors.shape[1] % settings.dims_per_block and len(ids) >= SMALL:
        raise DataError(f"{vectors.shape[1]}-d vectors: dims_per_block {settings.dims_per_block} must divide it")
    leaves = settings.leaves_for(len(ids))
    from ..machine import cpu_cores

    raw = _scann().scann_pybind.ScannNumpy(vectors, _config(len(ids), vectors.shape[1], settings, leaves),
                                           threads or cpu_cores())
    return ScannIndex(raw, vectors, ids, list(range(len(ids))), meta, settings, leaves)


def is_scann_index(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_scann(path: str | Path, mmap: bool = True) -> ScannIndex:
    """The index saved in folder `path` (full vectors memory-mapped unless `mmap` is False); DataError naming the
    folder for anything that is not a whole index of this format."""
    folder = Path(path)
    try:
        manifest = read_json(folder / MANIFEST)
        files, n = manifest["files"], int(manifest["rows"])
        settings, leaves = ScannSettings(**manifest["settings"]), int(manifest["leaves"])
        assert manifest["format"] == FORMAT
    except (DataError, Unreadable, KeyError, TypeError, ValueError, AssertionError) as e:
        raise index_error(f"{str(folder / MANIFEST)!r} is not a whole manifest of {FORMAT!r} ({e})", ADVICE) from None
    missing = [str(name) for name in files.values() if not (folder / str(name)).exists()]
    if missing:
        raise index_error(f"index {str(folder)!r} is missing {', '.join(missing)}", ADVICE)
    try:
        vectors = np.load(folder / files["vectors"], mmap_mode="r" if mmap else None, allow_pickle=False)
        assets = (folder / files["scann"] / "scann_assets.pbtxt").read_text(encoding="utf-8")
        # ScaNN's own loader would also unpickle a docids file if one were there; this one reads only its assets
        searcher = _scann().scann_pybind.ScannNumpy(str(folder / files["scann"]), assets)
    except (OSError, ValueError, RuntimeError) as e:
        raise index_error(f"index {str(folder)!r} is not readable ({e})", ADVICE) from None
    rows = load_npz(folder / files["rows"], ("ids", "alive", "points"), hint=REBUILD, advice=ADVICE)
    alive = rows["alive"].tolist()
    if vectors.shape != (n, manifest.get("dim")) or len(alive) != n or len(rows["points"]) != searcher.size() or (
            sum(alive) != searcher.size()):
        raise index_error(f"the files of index {str(folder)!r} do not agree on its size ({n} rows)", ADVICE)
    row_ids = [str(i) if a else None for i, a in zip(rows["ids"].tolist(), alive, strict=True)]
    return ScannIndex(searcher, vectors, row_ids, [int(p) for p in rows["points"]], manifest.get("meta"),
                      settings, leaves)
