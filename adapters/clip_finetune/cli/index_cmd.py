"""`clip-finetune index` builds an approximate index from an embeddings store (--method scann: retrieval/scann_index.py,
the default; hnsw: retrieval/ann.py), and `search --index FOLDER` answers from it; the exact path stays in
main.cmd_search."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from ..errors import DataError


def cmd_index(args: argparse.Namespace) -> int:
    from ..files import require_writable
    from ..retrieval import scann_index
    from ..retrieval.ann import MANIFEST, AnnSettings, build_ann
    from ..retrieval.store import read_embeddings

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {args.out!r} is a file; name a folder for the index")
    ours = (out / MANIFEST).is_file() or scann_index.is_scann_index(out)
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise DataError(f"--out {args.out!r} holds other files; name a new folder (or an index to replace)")
    require_writable(out, "--out")
    if args.method == "scann":  # settings before reading a large store: a bad one fails at once
        settings: Any = scann_index.ScannSettings(leaves=args.leaves, search_share=args.search_share)
        scann_index._scann()  # installed?
    else:
        settings = AnnSettings(storage=args.storage, connectivity=args.connectivity, expansion_search=args.expansion)
    store = read_embeddings(args.embeddings)
    if not store.ids:
        raise DataError(f"--embeddings {args.embeddings!r} holds no vectors; embed some images first")
    started = time.perf_counter()
    if args.method == "scann":
        index: Any = scann_index.build_scann(store.ids, store.vectors, store.meta, settings)
    else:
        index = build_ann(store.ids, store.vectors, store.meta, settings, show_progress=True)
    index.save(out)
    _drop_other_method(out, args.method)
    print(f"indexed {len(index):,} vectors of {index.dim} dimensions into {out} in "
          f"{time.perf_counter() - started:.1f} s: {index.describe()}")
    return 0


def _drop_other_method(out: Path, method: str) -> None:
    """After replacing an index of the other method: its manifest and the files only it used go."""
    import shutil

    from ..retrieval import ann, scann_index

    manifest, pattern = ((ann.MANIFEST, re.compile(r"^graph-[0-9a-f]{8}\.usearch$")) if method == "scann" else
                         (scann_index.MANIFEST, re.compile(r"^scann-[0-9a-f]{8}$")))
    (out / manifest).unlink(missing_ok=True)
    for old in out.iterdir():
        if pattern.match(old.name):
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def add_index_parser(sub: Any) -> None:
    from ..retrieval.ann import STORAGES

    p = sub.add_parser("index", help="build an approximate index (ScaNN or HNSW) of an embeddings file for fast "
                       "search", description="Build an approximate nearest-neighbour index of the image vectors of "
                       "an embeddings file (ScaNN partitions, or an HNSW graph with usearch); `search --index "
                       "FOLDER` then answers from it, re-ranking its candidates with exact scores. Needs pip "
                       "install -e \".[index]\". See docs/index.md.")
    p.add_argument("--embeddings", required=True, help="embeddings written by `embed --images`: an .npz / .parquet "
                   "file, or a sharded folder")
    p.add_argument("--out", required=True, help="index folder to write (new, or an index to replace)")
    p.add_argument("--method", choices=("scann", "hnsw"), default="scann", help="scann: k-means leaves scored "
                   "with 4-bit codes (recall holds for text queries at a million vectors); hnsw: a usearch graph "
                   "(docs/index.md compares them; default: scann)")
    p.add_argument("--search-share", type=float, default=0.25, help="scann: the share of the leaves each query "
                   "scores; more is better recall, slower queries (default: 0.25)")
    p.add_argument("--leaves", type=int, default=0, help="scann: k-means leaves (default: 0, about 4 sqrt(n))")
    p.add_argument("--storage", choices=STORAGES, default="i8", help="hnsw: what the graph keeps of each vector: i8 "
                   "(1 byte a dimension), f16 (2) or f32 (4); the full vectors are kept for re-ranking either way "
                   "(default: i8)")
    p.add_argument("--connectivity", type=int, default=16, help="hnsw: graph edges per vector (M): more is "
                   "better recall, more memory (default: 16)")
    p.add_argument("--expansion", type=int, default=512, help="hnsw: how wide each search walks the graph (usearch's "
                   "expansion_search, kept in the index): wider is better recall, slower queries; docs/index.md "
                   "measures it (default: 512)")
