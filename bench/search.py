"""Search at scale: brute force against approximate indexes with exact re-ranking, on CLIP-like vectors.

    python -m bench.search --n 1000000 --dim 512

prints one JSON line per index: `index` ("exact" is brute force), `recall_at_10` (of the exact top 10),
`p50_ms` (one query at a time, one thread; `p50_cpu_ms` its CPU time), `qps` (all queries in one batch, every
core, searched 3 times: the median of the 2nd and 3rd; `qps_first_batch` the cold first), `cpu_ms_per_query`
(that batch's CPU time a query, all threads: on a shared machine, what an idle one would give), `build_s`
(and `build_cpu_s`), `peak_rss_mb` (the index's own process: data loading included),
`bytes_per_vector` (the index alone; the re-rank also reads the 4 * dim bytes of full vectors, memory-mapped)
and `load_avg_1m`. Each index runs in its own child process, so its peak memory is its own; the vectors
(bench/clip_like.py) are generated once into --cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .clip_like import ClipLike
from .common import ROOT, cores, emit, load_spec, peak_rss_mb, run_child

DEFAULT_INDEXES = ("exact", "scann", "usearch-i8", "usearch-f16", "faiss-hnsw-sq8", "faiss-ivf-pq", "hnswlib-f32")
LATENCY_QUERIES = {"exact": 20}  # single queries timed for p50; brute force at 1M takes ~0.1 s each
LATENCY_DEFAULT = 200
BATCH_REPEATS = 3  # the whole query set searched as one batch, 3 times: `qps` is the warm batches' median


def generate(folder: Path, n: int, dim: int, queries: int, seed: int) -> Path:
    """images.npy [n, dim] and texts.npy [queries, dim] in `folder` (reused when there)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, texts = folder / "images.npy", folder / "texts.npy"
    if not images.is_file():
        gen = ClipLike(dim, n, seed)
        out = np.lib.format.open_memmap(folder / "images.tmp.npy", "w+", np.float32, (n, dim))
        start = 0
        for chunk in gen.images():
            out[start:start + len(chunk)] = chunk
            start += len(chunk)
        out.flush()
        del out
        (folder / "images.tmp.npy").rename(images)
        np.save(texts, gen.texts(queries))
    return folder


def child(spec: dict) -> dict:
    """Build one index over the cached vectors and measure it."""
    from .search_backends import BACKENDS

    folder, name, k = Path(spec["folder"]), spec["index"], spec["k"]
    t0, cpu0 = time.perf_counter(), time.process_time()
    images = np.load(folder / "images.npy", mmap_mode="r")
    vectors = np.ascontiguousarray(images) if name == "exact" else images
    index = BACKENDS[name](vectors)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    texts = np.load(folder / "texts.npy")
    latencies, cpu_latencies = [], []
    for query in texts[:LATENCY_QUERIES.get(name, LATENCY_DEFAULT)]:
        t, cpu = time.perf_counter(), time.process_time()
        index.search(query[None], k, threads=1)
        latencies.append(1000 * (time.perf_counter() - t))
        cpu_latencies.append(1000 * (time.process_time() - cpu))  # waits for a busy core excluded
    batches = []  # (wall s, CPU s) of each batch: the first pays the cold start (thread pool, pages of the vectors)
    for _ in range(BATCH_REPEATS):
        t, cpu = time.perf_counter(), time.process_time()
        rows, _ = index.search(texts, k)
        batches.append((time.perf_counter() - t, time.process_time() - cpu))
    steady = sorted(batches[1:] or batches)[len(batches[1:] or batches) // 2]  # the median of the warm batches
    qps, qps_first = len(texts) / steady[0], len(texts) / batches[0][0]
    cpu_ms = 1000 * steady[1] / len(texts)  # every thread's CPU time: what the load cannot hide
    truth_file = folder / f"truth-{k}.npy"
    if name == "exact":
        np.save(truth_file, rows)
    truth = np.load(truth_file)
    recall = np.mean([len(set(r.tolist()) & set(t.tolist())) / k for r, t in zip(rows, truth, strict=True)])
    return {"index": name, "n": len(images), "dim": images.shape[1], "queries": len(texts),
            f"recall_at_{k}": round(float(recall), 4), "p50_ms": round(float(np.median(latencies)), 3),
            "p50_cpu_ms": round(float(np.median(cpu_latencies)), 3),
            "qps": round(qps, 1), "qps_first_batch": round(qps_first, 1), "cpu_ms_per_query": round(cpu_ms, 3),
            "build_s": round(build_s, 2), "build_cpu_s": round(build_cpu_s, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "bytes_per_vector": round(float(index.bytes_per_vector), 1),
            "load_avg_1m": round(os.getloadavg()[0], 1)}  # the machine is shared: how busy it was


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="stored (image) vectors (default: 100000)")
    parser.add_argument("--dim", type=int, default=512, help="dimensions (default: 512, ViT-B/32's)")
    parser.add_argument("--queries", type=int, default=1000, help="text queries (default: 1000)")
    parser.add_argument("-k", type=int, default=10, help="results per query scored for recall (default: 10)")
    parser.add_argument("--indexes", default=",".join(DEFAULT_INDEXES),
                        help=f"comma-separated, exact first (default: {','.join(DEFAULT_INDEXES)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the vectors (default: 0)")
    parser.add_argument("--cache", default=str(ROOT / ".bench_cache"), help="where vectors are generated "
                        "(default: ./.bench_cache; 2 GB at 1M x 512)")
    parser.add_argument("--threads", type=int, default=0, help="cores the batch search uses (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(child(load_spec(args.child)))
        return 0
    folder = generate(Path(args.cache) / f"search-{args.n}x{args.dim}-q{args.queries}-s{args.seed}",
                      args.n, args.dim, args.queries, args.seed)
    names = [n for n in args.indexes.split(",") if n]
    if "exact" not in names and not (folder / f"truth-{args.k}.npy").is_file():
        names.insert(0, "exact")  # recall is measured against brute force
    for name in names:
        spec = {"system": name, "index": name, "folder": str(folder), "k": args.k}
        result = run_child("bench.search", spec, args.threads or cores())
        result.pop("wall_s", None)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
