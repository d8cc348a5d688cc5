"""Sharded embedding: each process or machine embeds one slice of the inputs into its own part file; an
index joins the parts; a re-run skips the parts already written. docs/scale.md shows the commands.

An output folder of N shards holds
  part-0000I-of-0000N.npz  one per shard: `ids`, `vectors` (as a plain embeddings .npz) and `meta` (JSON)
  index.json               the parts, their counts and skipped images, dim, model, the job's fingerprint

Shard I embeds the contiguous slice [I*n//N, (I+1)*n//N) of the n sorted inputs, so the parts joined in
shard order are the input order. The job's fingerprint hashes the full input list, the model (its config and
weights), the settings that change the output and N: a part or index of another job in the folder is an
error, never mixed in. Parts are written atomically (temporary file + rename), so a part that exists is
complete; after writing its part, a shard writes the index if every part is there. Two shards finishing
together both write the same bytes (the index is built from the part files alone), each by an atomic
rename: either way the index is whole and correct.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, Setting
from ..files import atomic_write
from ..model.clip import ClipModel
from ..model.weights import unwrap
from .embed import encode_items
from .store import FORMAT, INDEX_NAME, LISTED, PART_RE, embeddings_arrays, part_name, read_part_meta, write_npz

log = logging.getLogger(__name__)
# the settings the errors advise (errors.Setting): the CLI says them as its flags, the API by these names
SHARD_SETTINGS = {"index": Setting("shard_index"), "count": Setting("num_shards")}
OUT = {"out": Setting("out")}


@dataclass(frozen=True)
class ShardSpec:
    """Which part this process embeds: `index` of `count`; `source` says where that came from."""

    index: int
    count: int
    source: str  # "shard_index/num_shards" (the caller's) or "torchrun"


def shard_spec(shard_index: int | None, num_shards: int | None,
               environ: Mapping[str, str] | None = None) -> ShardSpec | None:
    """The shard of this process: from the flags, else from torchrun's RANK/WORLD_SIZE when WORLD_SIZE > 1,
    else None (one process writing one embeddings file, as without sharding)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError:
        raise DataError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r}: not integers") from None
    if shard_index is None and num_shards is None:
        return ShardSpec(rank, world, "torchrun") if world > 1 else None
    if shard_index is None or num_shards is None:
        raise DataError("{index} and {count} go together: give both, or neither", advice=SHARD_SETTINGS)
    if world > 1:
        raise DataError(f"{{index}}/{{count}} under torchrun (WORLD_SIZE={world}): give one or the other "
                        "(torchrun's ranks shard by themselves; across machines use torchrun --nnodes, or these "
                        "two on each machine)",
                        advice=SHARD_SETTINGS)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise DataError("{index} {count}: need 0 <= shard index < number of shards",
                        advice={"index": Setting("shard_index", str(shard_index)),
                                "count": Setting("num_shards", str(num_shards))})
    return ShardSpec(shard_index, num_shards, "shard_index/num_shards")


def pin_local_gpu(environ: Mapping[str, str] | None = None) -> None:
    """Under torchrun, make GPU LOCAL_RANK this process's "cuda" device, so ranks do not all share GPU 0."""
    local = (os.environ if environ is None else environ).get("LOCAL_RANK")
    if local is not None and local.isdigit() and torch.cuda.is_available():
        torch.cuda.set_device(int(local) % torch.cuda.device_count())


def shard_range(n: int, index: int, count: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of n inputs that shard `index` of `count` embeds."""
    return n * index // count, n * (index + 1) // count


def inputs_sha256(kind: str, items: Sequence[str]) -> str:
    """Hash of the ordered input list (image paths or texts)."""
    h = hashlib.sha256(kind.encode())
    for item in items:
        data = item.encode("utf-8", "surrogateescape")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def model_sha256(clip: ClipModel) -> str:
    """Hash of the model's config and weights: the same for the same weights wherever they are loaded from
    (a folder at another path, a pretrained tag). Hashes every weight once (about 1 s per GB)."""
    h = hashlib.sha256(json.dumps(clip.model_cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(unwrap(clip.model).state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def describe_job(clip: ClipModel, kind: str, items: Sequence[str], num_shards: int,
                 settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a sharded embedding job, and its fingerprint."""
    job = {"format": FORMAT, "kind": kind, "inputs": len(items), "inputs_sha256": inputs_sha256(kind, items),
           "model_sha256": model_sha256(clip), "settings": dict(settings or {}), "num_shards": num_shards}
    job["fingerprint"] = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:32]
    job["model"] = clip.source  # for people; not fingerprinted: the same weights may live at other paths
    return job


def _differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    reasons = []
    if theirs.get("format") != ours["format"]:
        reasons.append(f"format {theirs.get('format')!r}")
    if theirs.get("kind") != ours["kind"]:
        reasons.append(f"it embeds {theirs.get('kind')}, this run {ours['kind']}")
    elif theirs.get("inputs_sha256") != ours["inputs_sha256"]:
        reasons.append(f"different inputs: {theirs.get('inputs')} {ours['kind']} there, {ours['inputs']} now")
    if theirs.get("model_sha256") != ours["model_sha256"]:
        reasons.append(f"a different model: {theirs.get('model')} there, {ours['model']} now")
    if theirs.get("num_shards") != ours["num_shards"]:
        reasons.append(f"{theirs.get('num_shards')} shards there, {ours['num_shards']} now")
    if theirs.get("settings") != ours["settings"]:
        reasons.append(f"settings {theirs.get('settings')} there, {ours['settings']} now")
    return "; ".join(reasons) or "a different fingerprint"


def _conflict(path: Path, folder: Path, theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> DataError:
    return DataError(f"{str(path)!r} belongs to another embedding job ({_differences(theirs, ours)}); parts of "
                     f"different jobs are never mixed: use a new {{out}} folder, or delete {str(folder)!r}",
                     advice=OUT)


def check_folder(folder: Path, job: Mapping[str, Any]) -> None:
    """Refuse a folder holding an index or a part of another job (other inputs, model, settings or N)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            theirs = json.loads(index.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{str(index)!r} is not readable ({e}); delete it (re-running a shard rewrites it)") \
                from None
        if theirs.get("fingerprint") != job["fingerprint"]:
            raise _conflict(index, folder, theirs, job)
    for path in sorted(folder.iterdir()):
        m = PART_RE.match(path.name)
        if not m:
            continue
        if int(m.group(2)) != job["num_shards"]:
            raise DataError(f"{str(path)!r} is a part of a {int(m.group(2))}-shard job, this run has "
                            f"{job['num_shards']} shards; parts of different jobs are never mixed: use a new {{out}} "
                            f"folder, or delete {str(folder)!r}", advice=OUT)
        theirs = read_part_meta(path)
        if theirs.get("fingerprint") != job["fingerprint"]:
            raise _conflict(path, folder, theirs, job)


@dataclass
class ShardResult:
    part: Path
    meta: dict[str, Any]
    done_before: bool  # the part was already there: nothing was embedded
    index: Path | None  # written by this process (every part was there)

    @property
    def summary(self) -> str:
        m = self.meta
        bad = f"; {m['skipped']} undecodable images skipped" if m["skipped"] else ""
        what = (f"part {self.part} already done, skipping ({m['count']} vectors{bad})" if self.done_before else
                f"wrote {m['count']} vectors of {m['dim']} dimensions to {self.part}{bad}")
        line = f"shard {m['shard']} of {m['num_shards']}: {what}"
        if self.index is not None:
            line += f"\nall {m['num_shards']} parts done: index {self.index}"
        else:
            line += "\nother parts still missing: the last shard to finish writes index.json"
        return line


def embed_shard(clip: ClipModel, kind: str, items: Sequence[str], out: str | Path, spec: ShardSpec,
                batch_size: int = 64, num_workers: int | None = None,
                settings: Mapping[str, Any] | None = None, progress: bool = True) -> ShardResult:
    """Embed shard `spec` of `items` (image paths, kind "images", or texts, kind "texts") into the folder
    `out`, unless its part is already there; then write the index if every part is.

    `settings`: anything besides the model and inputs that changes the output (fingerprinted).
    """
    if kind not in ("images", "texts"):
        raise ValueError(f"kind {kind!r}: 'images' or 'texts'")
    folder = Path(out)
    if folder.suffix.lower() in (".npz", ".parquet") or (folder.exists() and not folder.is_dir()):
        raise DataError(f"{{out}} {str(folder)!r}: with sharding, {{out}} is a folder (it gets one part file per "
                        "shard and index.json)", advice=OUT)
    job = describe_job(clip, kind, items, spec.count, settings)
    folder.mkdir(parents=True, exist_ok=True)
    check_folder(folder, job)
    part = folder / part_name(spec.index, spec.count)
    if part.is_file():  # check_folder passed: it is a complete part of this very job
        meta = read_part_meta(part)
        log.info("part %s already done, skipping", part)
        done_before = True
    else:
        start, stop = shard_range(len(items), spec.index, spec.count)
        log.info("shard %d of %d (%s): %s %d-%d of %d", spec.index, spec.count, spec.source, kind, start,
                 stop, len(items))
        ids, vectors, skipped = encode_items(clip, kind, items[start:stop], batch_size, num_workers, progress)
        meta = {**job, "shard": spec.index, "start": start, "stop": stop, "count": len(ids),
                "skipped": len(skipped), "skipped_examples": skipped[:LISTED], "dim": int(vectors.shape[1])}
        _write_part(part, ids, vectors, meta)
        done_before = False
    return ShardResult(part, meta, done_before, write_index_if_complete(folder, job))


def _write_part(path: Path, ids: Sequence[str], vectors: np.ndarray, meta: Mapping[str, Any]) -> None:
    write_npz(path, embeddings_arrays(ids, vectors, meta))  # a plain embeddings .npz with its job's meta


def write_index_if_complete(folder: Path, job: Mapping[str, Any]) -> Path | None:
    """Write index.json when all parts of `job` are in `folder`; None (and nothing written) otherwise."""
    n = job["num_shards"]
    metas = []
    for i in range(n):
        path = folder / part_name(i, n)
        if not path.is_file():
            log.info("index not written yet: %s (and maybe others) missing", path.name)
            return None
        meta = read_part_meta(path)
        if meta.get("fingerprint") != job["fingerprint"]:  # written since check_folder ran
            raise _conflict(path, folder, meta, job)
        metas.append(meta)
    text = json.dumps(build_index(metas), indent=2) + "\n"
    target = folder / INDEX_NAME
    if not (target.is_file() and target.read_text() == text):  # a re-run leaves a current index untouched
        atomic_write(target, lambda p: p.write_text(text))
    return target


def build_index(metas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The index of a complete set of parts, from their metadata alone (so every writer writes the same)."""
    first = metas[0]
    keys = ("format", "kind", "fingerprint", "inputs", "inputs_sha256", "model", "model_sha256", "settings",
            "num_shards")
    return {
        **{k: first[k] for k in keys},
        "dim": first["dim"],
        "total": sum(m["count"] for m in metas),
        "skipped": sum(m["skipped"] for m in metas),
        "parts": [{"file": part_name(m["shard"], m["num_shards"]), "shard": m["shard"], "start": m["start"],
                   "stop": m["stop"], "count": m["count"], "skipped": m["skipped"]} for m in metas],
    }
