"""The indexes bench/search.py measures, each behind build(vectors) -> search(queries, k, threads) -> (rows, scores).

Every approximate one proposes `candidates` rows from its compressed vectors, and ann.rerank scores them exactly
with the full float32 vectors, as the shipped index (retrieval/ann.py) does: only the candidate source differs.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adapters.clip_finetune.retrieval.ann import AnnSettings, build_ann, rerank
from adapters.clip_finetune.retrieval.ranking import top_k

CANDIDATES = AnnSettings().candidates
EF = AnnSettings().expansion_search


class Exact:
    """Brute force: every query against every vector, one matrix product per block of queries."""

    bytes_per_vector = 4.0

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors)
        self.bytes_per_vector = 4.0 * vectors.shape[1]

    def search(self, queries: np.ndarray, k: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rows, scores = [], []
        for start in range(0, len(queries), 64):  # [64, n] scores at a time: 256 MB at n = 1M
            r, s = top_k(queries[start:start + 64] @ self.vectors.T, k)
            rows.append(r)
            scores.append(s)
        return np.concatenate(rows), np.concatenate(scores)


class Usearch:
    """The shipped index (retrieval/ann.py): usearch HNSW over `storage` vectors, re-ranked."""

    def __init__(self, vectors: np.ndarray, storage: str) -> None:
        threads = int(os.environ.get("BENCH_BUILD_THREADS", "0"))  # 0: one a core
        self.index = build_ann([str(i) for i in range(len(vectors))], vectors, settings=AnnSettings(storage=storage),
                               threads=threads)
        self.bytes_per_vector = self.index._graph.serialized_length / len(vectors)

    def search(self, queries: np.ndarray, k: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.index.search(queries, k, threads=threads)
        return np.asarray([[int(i) for i in row] for row in ids]), scores


class Scann:
    """The partitioned index (retrieval/scann_index.py): ScaNN leaves and 4-bit codes, re-ranked."""

    def __init__(self, vectors: np.ndarray) -> None:
        from adapters.clip_finetune.retrieval.scann_index import build_scann

        self.index = build_scann([str(i) for i in range(len(vectors))], vectors)
        with tempfile.TemporaryDirectory() as tmp:  # ScaNN's own files: the leaves, codebooks and codes
            self.index._searcher.serialize(tmp, True)
            self.bytes_per_vector = sum(f.stat().st_size for f in Path(tmp).iterdir()) / len(vectors)

    def search(self, queries: np.ndarray, k: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.index.search(queries, k, threads=threads)
        return np.asarray([[int(i) for i in row] for row in ids]), scores


class _Candidates:
    """A library that proposes candidate rows; re-ranked here with the full vectors."""

    vectors: np.ndarray

    def candidates(self, queries: np.ndarray, count: int, threads: int) -> np.ndarray:
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rows = self.candidates(queries, max(k, CANDIDATES), threads).astype(np.int64)
        counts = (rows >= 0).sum(axis=1)
        order = np.argsort(rows < 0, axis=1, kind="stable")  # valid rows first, as rerank expects
        return rerank(self.vectors, queries, np.take_along_axis(rows, order, axis=1), counts, k)


class Faiss(_Candidates):
    """FAISS: HNSW over 8-bit scalar-quantised vectors, or IVF with product quantisation (64 bytes a vector)."""

    def __init__(self, vectors: np.ndarray, kind: str) -> None:
        import faiss

        self.faiss, self.vectors = faiss, vectors
        n, d = vectors.shape
        if kind == "hnsw-sq8":
            self.index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, 16, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = 128
            self.index.hnsw.efSearch = EF
        else:  # ivf-pq: nlist ~ 4 sqrt(n) (FAISS's guidelines), 64 sub-quantisers of 8 bits
            nlist = max(16, int(4 * math.sqrt(n)))
            self.index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, 64, 8, faiss.METRIC_INNER_PRODUCT)
            self.index.nprobe = max(8, nlist // 32)
        train = vectors[np.random.default_rng(0).choice(n, min(n, 100_000), replace=False)]
        self.index.train(train)
        self.index.add(vectors)
        self.bytes_per_vector = len(faiss.serialize_index(self.index)) / n

    def candidates(self, queries: np.ndarray, count: int, threads: int) -> np.ndarray:
        self.faiss.omp_set_num_threads(threads or _cores())
        return self.index.search(queries, count)[1]


class Hnswlib(_Candidates):
    """hnswlib: HNSW over float32 vectors (it stores no compressed form)."""

    def __init__(self, vectors: np.ndarray) -> None:
        import hnswlib

        self.vectors = vectors
        n, d = vectors.shape
        self.index = hnswlib.Index(space="ip", dim=d)
        self.index.init_index(max_elements=n, ef_construction=128, M=16)
        self.index.add_items(vectors, np.arange(n), num_threads=_cores())
        self.index.set_ef(EF)
        with tempfile.TemporaryDirectory() as tmp:  # hnswlib saves only to a file
            self.index.save_index(f"{tmp}/index.bin")
            self.bytes_per_vector = os.path.getsize(f"{tmp}/index.bin") / n

    def candidates(self, queries: np.ndarray, count: int, threads: int) -> np.ndarray:
        return self.index.knn_query(queries, k=count, num_threads=threads or _cores())[0]


def _cores() -> int:
    from .common import cores

    return cores()


BACKENDS: dict[str, Callable[[np.ndarray], object]] = {
    "exact": Exact,
    "scann": Scann,
    "usearch-i8": lambda v: Usearch(v, "i8"),
    "usearch-f16": lambda v: Usearch(v, "f16"),
    "faiss-hnsw-sq8": lambda v: Faiss(v, "hnsw-sq8"),
    "faiss-ivf-pq": lambda v: Faiss(v, "ivf-pq"),
    "hnswlib-f32": Hnswlib,
}
