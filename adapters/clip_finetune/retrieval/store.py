"""Embeddings files: `.npz` with `ids` (str, [n]) and `vectors` (float32, [n, d]) for numpy
(`np.load(f)["vectors"]`), or `.parquet` (columns `id`, `vector`) for pandas (`pd.read_parquet(f)`).
A sharded embedding (shards.py) writes a folder of parts and an index.json; load_embeddings joins them.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

FORMAT = "clip-finetune sharded embeddings v1"
INDEX_NAME = "index.json"
PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.npz$")
LISTED = 10  # missing shards / skipped images named in messages


def save_embeddings(path: str | Path, ids: Sequence[str], vectors: np.ndarray) -> Path:
    """Write ids + vectors as .npz (numpy) or .parquet (pandas; needs pyarrow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise DataError("writing .parquet needs pandas and pyarrow: pip install -e \".[parquet]\" (or pip install "
                            "pandas pyarrow), or write .npz") from None
        pd.DataFrame({"id": list(ids), "vector": list(vectors)}).to_parquet(path)
    elif path.suffix == ".npz":
        np.savez(path, ids=np.asarray(list(ids), dtype=str), vectors=vectors)
    else:
        raise DataError(f"embeddings file {str(path)!r}: use a .npz (numpy) or .parquet (pandas) name")
    return path


def load_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read an embeddings file written by save_embeddings: (ids, vectors [n, d] float32).

    A sharded-embeddings folder (or its index.json) is joined in input order; a missing part is an error.
    """
    path = Path(path)
    if path.is_dir() or path.name == INDEX_NAME:
        return load_sharded(path)
    if not path.is_file():
        raise DataError(f"embeddings file {str(path)!r} does not exist; create it with `clip-finetune embed`")
    if path.suffix == ".parquet":
        import pandas as pd

        df = pd.read_parquet(path)
        return df["id"].astype(str).tolist(), np.stack(df["vector"].to_numpy()).astype(np.float32)
    with np.load(path, allow_pickle=False) as data:
        return data["ids"].tolist(), data["vectors"].astype(np.float32)


# --- sharded embeddings (written by shards.py) ---------------------------------------------------------------


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.npz"


def read_part(path: Path, arrays: bool = True) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """A part's (meta, ids, vectors); with arrays=False only meta is read (ids and vectors come back empty)."""
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not an .npz (zip) file")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].item())
            if not arrays:
                return meta, [], np.zeros((0, 0), np.float32)
            return meta, data["ids"].tolist(), data["vectors"].astype(np.float32)
    except Exception as e:  # a zip/npz/JSON error: a file this module did not write, or a damaged one
        raise DataError(f"{str(path)!r} is not a readable embeddings part ({type(e).__name__}: {e}); "
                        "delete it and run its shard again") from None


def read_part_meta(path: Path) -> dict[str, Any]:
    return read_part(path, arrays=False)[0]


def _missing_error(folder: Path, missing: Sequence[int], n: int) -> DataError:
    names = ", ".join(f"shard {i} ({part_name(i, n)})" for i in missing[:LISTED])
    more = f" and {len(missing) - LISTED} more" if len(missing) > LISTED else ""
    return DataError(
        f"sharded embeddings {str(folder)!r} are incomplete: {len(missing)} of {n} parts missing: {names}{more}; "
        f"run `clip-finetune embed ... --out {folder} --num-shards {n} --shard-index I` for each missing I, "
        "with the same inputs and model"
    )


def load_sharded(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(ids, vectors) of a sharded embeddings folder (or its index.json), joined in input order.

    Without index.json (its writer failed, or a shard is still running) the part files found are joined
    when they are all there; a missing part is an error naming its shard.
    """
    path = Path(path)
    folder = path.parent if path.name == INDEX_NAME else path
    index_path = folder / INDEX_NAME
    index = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            n, fingerprint = int(index["num_shards"]), index["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{str(index_path)!r} is not a sharded-embeddings index ({e})") from None
    elif not folder.is_dir():
        raise DataError(f"{str(path)!r} does not exist; create it with `clip-finetune embed --num-shards N ...`")
    else:
        counts = sorted({int(m.group(2)) for p in folder.iterdir() if (m := PART_RE.match(p.name))})
        if not counts:
            raise DataError(f"{str(folder)!r} holds neither {INDEX_NAME} nor part-*-of-*.npz files: not sharded "
                            "embeddings (write them with `clip-finetune embed --num-shards N --shard-index I`)")
        if len(counts) > 1:
            raise DataError(f"{str(folder)!r} mixes parts of jobs with {counts} shards; delete the stale ones")
        n, fingerprint = counts[0], None
    missing = [i for i in range(n) if not (folder / part_name(i, n)).is_file()]
    if missing:
        raise _missing_error(folder, missing, n)
    ids: list[str] = []
    vectors = []
    dim = 0
    for i in range(n):
        part = folder / part_name(i, n)
        meta, part_ids, part_vectors = read_part(part)
        fingerprint = fingerprint or meta.get("fingerprint")
        if meta.get("fingerprint") != fingerprint or len(part_ids) != meta.get("count"):
            raise DataError(f"{str(part)!r} does not belong with the other parts of {str(folder)!r} (another "
                            f"job's part); delete it and run shard {i} again")
        ids += part_ids
        vectors.append(part_vectors)
        dim = int(meta["dim"])
    if index is not None and len(ids) != index.get("total"):
        raise DataError(f"{str(folder)!r}: the parts hold {len(ids)} vectors, {INDEX_NAME} says {index.get('total')}; "
                        f"delete {INDEX_NAME} (re-running any shard rewrites it)")
    return ids, (np.concatenate(vectors) if ids else np.zeros((0, dim), np.float32))
