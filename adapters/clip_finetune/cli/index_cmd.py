"""`clip-finetune index` builds the approximate index (retrieval/ann.py) from an embeddings store, and `search
--index FOLDER` answers from it; the exact path stays in main.cmd_search."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import DataError


def cmd_index(args: argparse.Namespace) -> int:
    from ..files import require_writable
    from ..retrieval.ann import MANIFEST, AnnSettings, build_ann
    from ..retrieval.store import read_embeddings

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {args.out!r} is a file; name a folder for the index")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DataError(f"--out {args.out!r} holds other files; name a new folder (or an index to replace)")
    require_writable(out, "--out")
    settings = AnnSettings(storage=args.storage, connectivity=args.connectivity,  # before reading a large store
                           expansion_search=args.expansion)
    store = read_embeddings(args.embeddings)
    if not store.ids:
        raise DataError(f"--embeddings {args.embeddings!r} holds no vectors; embed some images first")
    started = time.perf_counter()
    index = build_ann(store.ids, store.vectors, store.meta, settings, show_progress=True)
    index.save(out)
    print(f"indexed {len(index):,} vectors of {index.dim} dimensions into {out} in "
          f"{time.perf_counter() - started:.1f} s: {index.describe()}")
    return 0


def add_index_parser(sub: Any) -> None:
    from ..retrieval.ann import STORAGES

    p = sub.add_parser("index", help="build an approximate index (usearch) of an embeddings file for fast search",
                       description="Build an approximate nearest-neighbour index (HNSW, usearch) of the image "
                       "vectors of an embeddings file; `search --index FOLDER` then answers from it, re-ranking "
                       "its candidates with exact scores. Needs pip install -e \".[index]\". "
                       "See docs/index.md.")
    p.add_argument("--embeddings", required=True, help="embeddings written by `embed --images`: an .npz / .parquet "
                   "file, or a sharded folder")
    p.add_argument("--out", required=True, help="index folder to write (new, or an index to replace)")
    p.add_argument("--storage", choices=STORAGES, default="i8", help="what the graph keeps of each vector: i8 "
                   "(1 byte a dimension), f16 (2) or f32 (4); the full vectors are kept for re-ranking either way "
                   "(default: i8)")
    p.add_argument("--connectivity", type=int, default=16, help="graph edges per vector (HNSW's M): more is "
                   "better recall, more memory (default: 16)")
    p.add_argument("--expansion", type=int, default=512, help="how wide each search walks the graph (usearch's "
                   "expansion_search, kept in the index): wider is better recall, slower queries; docs/index.md "
                   "measures it (default: 512)")
