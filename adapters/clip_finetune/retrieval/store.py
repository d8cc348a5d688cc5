"""THE embeddings store: every embeddings file is written by write_npz (or save_embeddings' .parquet branch) and
read by read_embeddings. `.npz` with `ids` (str, [n]) and `vectors` (float32, [n, d]) for numpy
(`np.load(f)["vectors"]`), or `.parquet` (columns `id`, `vector`) for pandas (`pd.read_parquet(f)`).
A sharded embedding (shards.py) writes a folder of parts (each a plain embeddings .npz with its job's `meta`) and
an index.json; read_embeddings joins them. Search opens them as an Index (exact_index.py, index.open_index).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, Setting
from ..files import atomic_write, require_writable
from ..inputs import MAX_JSON_BYTES, Unreadable, parse_json, read_json, require_file
from .safe_npz import load_npz

FORMAT = "clip-finetune sharded embeddings v1"
INDEX_NAME = "index.json"
PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.npz$")
LISTED = 10  # missing shards / skipped images named in messages


EMBEDDINGS_FORMAT = "clip-finetune embeddings v1"
PARQUET_HINT = "writing and reading .parquet needs pandas and pyarrow: pip install pandas pyarrow"


@dataclass
class Embeddings:
    """What an embeddings file holds: ids [n], unit vectors [n, d] float32, and who made them (`meta`: kind
    'images' or 'texts', model, model_sha256; None when the file records nothing, e.g. one made elsewhere)."""

    ids: list[str]
    vectors: np.ndarray
    meta: dict[str, Any] | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write `arrays` as an .npz atomically (a reader never sees half a file): the one .npz writer of embeddings
    files, shard parts and a run's example embeddings."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


def embeddings_arrays(ids: Sequence[str], vectors: np.ndarray, meta: Mapping[str, Any] | None
                      ) -> dict[str, np.ndarray]:
    """The arrays of an embeddings .npz: ids, float32 vectors and, when given, meta as JSON text."""
    arrays = {"ids": np.asarray(list(ids), dtype=str), "vectors": np.ascontiguousarray(vectors, np.float32)}
    if meta:
        arrays["meta"] = np.asarray(json.dumps(dict(meta)))
    return arrays


OUT = Setting("out")  # the argument that names an embeddings file to write, unless a caller names another
EMBED = Setting("embed", None, "the embed use case")  # the CLI says `clip-finetune embed`
ADVICE = {"embed": EMBED}  # the advice of every error that says to embed again ({embed} in its message)


def check_embeddings_out(path: str | Path, what: str | Setting = OUT) -> Path:
    """Refuse, before any embedding, an output the writing would fail on: a suffix other than .npz/.parquet, a
    folder, a place this user cannot write, .parquet without pandas and pyarrow. `what` names the file: words,
    or the argument that named it (said by each face in its terms)."""
    path = Path(path)
    advice = {"what": what} if isinstance(what, Setting) else None
    name = "{what}" if advice else what
    if path.suffix not in (".npz", ".parquet"):
        raise DataError(f"{name} {str(path)!r}: use a .npz (numpy) or .parquet (pandas) file name", advice=advice)
    if path.is_dir():
        raise DataError(f"{name} {str(path)!r} is a folder; name the .npz or .parquet file to write", advice=advice)
    require_writable(path.parent, what)
    if path.suffix == ".parquet" and not all(importlib.util.find_spec(m) for m in ("pandas", "pyarrow")):
        raise DataError(f"{name} {str(path)!r}: {PARQUET_HINT}, or write .npz", advice=advice)
    return path


def save_embeddings(path: str | Path, ids: Sequence[str], vectors: np.ndarray,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ids + vectors (and `meta`: who made them) as .npz (numpy) or .parquet (pandas; needs pyarrow),
    atomically."""
    path = check_embeddings_out(path, "embeddings file")
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    meta = {"format": EMBEDDINGS_FORMAT, **meta, "dim": int(vectors.shape[1]), "count": len(ids)} if meta else None
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.DataFrame({"id": list(ids), "vector": list(vectors)})
        frame.attrs["clip_finetune"] = meta or {}  # kept in the file's metadata by pandas' pyarrow engine
        atomic_write(path, lambda tmp: frame.to_parquet(tmp))
    else:
        write_npz(path, embeddings_arrays(ids, vectors, meta))
    return path


def load_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read an embeddings file written by save_embeddings: (ids, vectors [n, d] float32).

    A sharded-embeddings folder (or its index.json) is joined in input order; a missing part is an error.
    """
    emb = read_embeddings(path)
    return emb.ids, emb.vectors


def read_embeddings(path: str | Path) -> Embeddings:
    """An embeddings file (or sharded folder) with who made it, checked: a readable file, ids [n] and finite vectors
    [n, d]; DataError naming the file otherwise."""
    path = Path(path)
    if path.is_dir() or path.name == INDEX_NAME:
        return load_sharded(path)
    if not path.exists():
        raise DataError(f"embeddings file {str(path)!r} does not exist; create it with {{embed}}",
                        advice=ADVICE)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    arrays = load_npz(path, ("ids", "vectors"), ("meta",), REDO, advice=ADVICE)
    meta = _meta(arrays["meta"], path) if "meta" in arrays else None
    return Embeddings(*checked_arrays(path, arrays["ids"], arrays["vectors"]), meta)


REDO = "embed the items again with {embed}"  # each face names its embed


def _read_parquet(path: Path) -> Embeddings:
    require_file(path, "embeddings file")
    try:
        import pandas as pd

        frame = pd.read_parquet(path)
        ids, vectors = frame["id"].astype(str).to_numpy(), np.stack(frame["vector"].to_numpy())
    except ImportError:
        raise DataError(f"{str(path)!r}: {PARQUET_HINT}") from None
    except Exception as e:  # pyarrow's and pandas' many errors on a file that is not theirs or not whole
        raise DataError(f"{str(path)!r} is not a readable embeddings .parquet file ({type(e).__name__}: "
                        f"{str(e)[:200]}); {REDO}", advice=ADVICE) from None
    meta = frame.attrs.get("clip_finetune") or None
    return Embeddings(*checked_arrays(path, ids, vectors), meta if isinstance(meta, dict) else None)


def _meta(array: np.ndarray, path: Path) -> dict[str, Any] | None:
    try:
        meta = parse_json(str(array.item()) if array.ndim == 0 else "", path)
    except Unreadable:
        meta = None
    return meta if isinstance(meta, dict) else None


def checked_arrays(path: Path, ids: np.ndarray, vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(ids as text, vectors as float32) when they form an embeddings table; DataError naming the file otherwise."""
    where = f"embeddings {str(path)!r}"
    if vectors.ndim != 2 or vectors.shape[1] == 0 or vectors.dtype.kind not in "fiu":
        raise DataError(f"{where}: vectors must be numbers in a 2-D array [items, dimensions] (got {vectors.dtype} "
                        f"of shape {vectors.shape}); {REDO}", advice=ADVICE)
    if ids.ndim != 1 or len(ids) != len(vectors):
        raise DataError(f"{where}: {ids.size} ids for {len(vectors)} vectors (ids of shape {ids.shape}); they must "
                        f"pair up one to one; {REDO}", advice=ADVICE)
    vectors = vectors.astype(np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        example = str(ids[int(np.argmax(bad))])[:80]
        raise DataError(f"{where}: {int(bad.sum())} of {len(vectors)} vectors hold NaN or infinity (e.g. {example!r}); "
                        f"they would rank at random; {REDO}", advice=ADVICE)
    return [str(i) for i in ids.tolist()], vectors


# --- sharded embeddings (written by shards.py) ---------------------------------------------------------------


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.npz"


def read_part(path: Path, arrays: bool = True) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """A part's (meta, ids, vectors); with arrays=False only meta is read (ids and vectors come back empty)."""
    redo = "delete it and run its shard again"
    data = load_npz(path, ("meta", "ids", "vectors") if arrays else ("meta",), hint=redo)
    meta = _meta(data["meta"], path)
    if meta is None:
        raise DataError(f"{str(path)!r} is not a readable embeddings part (its meta is not a JSON object); {redo}")
    if not arrays:
        return meta, [], np.zeros((0, 0), np.float32)
    return (meta, *checked_arrays(path, data["ids"], data["vectors"]))


def read_part_meta(path: Path) -> dict[str, Any]:
    return read_part(path, arrays=False)[0]


def _missing_error(folder: Path, missing: Sequence[int], n: int) -> DataError:
    names = ", ".join(f"shard {i} ({part_name(i, n)})" for i in missing[:LISTED])
    more = f" and {len(missing) - LISTED} more" if len(missing) > LISTED else ""
    return DataError(
        f"sharded embeddings {str(folder)!r} are incomplete: {len(missing)} of {n} parts missing: {names}{more}; "
        "run {embed} again for each missing I, with the same inputs and model and {out} {count} {index}",
        advice={"embed": EMBED, "out": Setting("out", str(folder)), "count": Setting("num_shards", str(n)),
                "index": Setting("shard_index", "I")},
    )


def load_sharded(path: str | Path) -> Embeddings:
    """The embeddings of a sharded folder (or its index.json), joined in input order.

    Without index.json (its writer failed, or a shard is still running) the part files found are joined
    when they are all there; a missing part is an error naming its shard.
    """
    path = Path(path)
    folder = path.parent if path.name == INDEX_NAME else path
    index_path = folder / INDEX_NAME
    index = None
    if index_path.is_file():
        try:
            index = read_json(index_path, MAX_JSON_BYTES)
            n, fingerprint = int(index["num_shards"]), index["fingerprint"]
            if not 0 < n < 100_000:
                raise ValueError(f"num_shards {n}")
        except (Unreadable, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{str(index_path)!r} is not a sharded-embeddings index ({e})") from None
    elif not folder.is_dir():
        raise DataError(f"{str(path)!r} does not exist; create it with {{embed}} and {{count}}",
                        advice={"embed": EMBED, "count": Setting("num_shards", "N")})
    else:
        counts = sorted({int(m.group(2)) for p in folder.iterdir() if (m := PART_RE.match(p.name))})
        if not counts:
            raise DataError(f"{str(folder)!r} holds neither {INDEX_NAME} nor part-*-of-*.npz files: not sharded "
                            "embeddings (write them with {embed} and {count} {index})",
                            advice={"embed": EMBED, "count": Setting("num_shards", "N"),
                                    "index": Setting("shard_index", "I")})
        if len(counts) > 1:
            raise DataError(f"{str(folder)!r} mixes parts of jobs with {counts} shards; delete the stale ones")
        n, fingerprint = counts[0], None
    missing = [i for i in range(n) if not (folder / part_name(i, n)).is_file()]
    if missing:
        raise _missing_error(folder, missing, n)
    ids: list[str] = []
    vectors = []
    metas = []
    for i in range(n):
        part = folder / part_name(i, n)
        meta, part_ids, part_vectors = read_part(part)
        fingerprint = fingerprint or meta.get("fingerprint")
        if meta.get("fingerprint") != fingerprint or len(part_ids) != meta.get("count") or (
                vectors and part_vectors.shape[1] != vectors[0].shape[1]):
            raise DataError(f"{str(part)!r} does not belong with the other parts of {str(folder)!r} (another "
                            f"job's part); delete it and run shard {i} again")
        ids += part_ids
        vectors.append(part_vectors)
        metas.append(meta)
    if index is not None and len(ids) != index.get("total"):
        raise DataError(f"{str(folder)!r}: the parts hold {len(ids)} vectors, {INDEX_NAME} says {index.get('total')}; "
                        f"delete {INDEX_NAME} (re-running any shard rewrites it)")
    dim = int(metas[0].get("dim") or 0) if metas else 0
    made_by = {k: metas[0].get(k) for k in ("kind", "model", "model_sha256")} if metas else None
    return Embeddings(ids, np.concatenate(vectors) if ids else np.zeros((0, dim), np.float32), made_by)
