"""Read a Weights & Biases offline run's transaction log (run-*.wandb) back into its records.

wandb 0.31 has no Python reader (its scanner moved into the Go core), so the tests read the format themselves: a
7-byte header (":W&B", magic, version), then LevelDB's log format, 32 KiB blocks of chunks each with a 7-byte
header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last); each record is a wandb_internal_pb2.Record."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, out, partial = path.read_bytes(), HEADER, [], b""
    assert data[:4] == b":W&B", "not a wandb transaction log"
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (1, 4):
            out.append(partial + chunk)
            partial = b""
        elif kind in (2, 3):
            partial += chunk
    parsed = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history(path: Path) -> list[dict[str, str]]:
    """Each logged step's values, as the JSON text wandb stored."""
    return [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]


def summary(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update({item.key or "/".join(item.nested_key): item.value_json for item in r.summary.update})
    return out


def artifacts(path: Path) -> dict[str, list[str]]:
    return {r.artifact.name: [e.path for e in r.artifact.manifest.contents]
            for r in records(path) if r.WhichOneof("record_type") == "artifact"}


def config(path: Path) -> dict[str, str]:
    run = next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
    return {item.key: item.value_json for item in run.config.update}
