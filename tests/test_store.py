"""The one embeddings store (retrieval/store.py): write_npz is the single .npz writer (embeddings files, shard
parts, a run's example embeddings), files stay readable by plain numpy, files written before it still load,
and what is read is checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapters.clip_finetune.errors import DataError
from adapters.clip_finetune.retrieval.store import (
    embeddings_arrays,
    load_embeddings,
    read_embeddings,
    save_embeddings,
    write_npz,
)

VECTORS = np.eye(3, 4, dtype=np.float32)


def test_write_npz_writes_whole_files_numpy_reads_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "a.npz", {"x": np.arange(3), "names": np.array(["p", "q"])})
    with np.load(path) as data:
        assert data["x"].tolist() == [0, 1, 2] and data["names"].tolist() == ["p", "q"]
    write_npz(path, {"x": np.arange(5)})  # replaced whole
    with np.load(path) as data:
        assert data.files == ["x"] and len(data["x"]) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # np.savez did not add a second .npz suffix


def test_saved_embeddings_read_back_with_their_maker_and_numpy_reads_the_vectors(tmp_path: Path) -> None:
    meta = {"kind": "images", "model": "m", "model_sha256": "abc"}
    path = save_embeddings(tmp_path / "photos.npz", ["a", "b", "c"], VECTORS, meta)
    emb = read_embeddings(path)
    assert emb.ids == ["a", "b", "c"] and emb.dim == 4
    assert {k: emb.meta[k] for k in meta} == meta and emb.meta["count"] == 3 and emb.meta["dim"] == 4
    np.testing.assert_array_equal(np.load(path)["vectors"], VECTORS)  # the README's promise
    assert json.loads(str(np.load(path)["meta"]))["kind"] == "images"


def test_files_written_before_the_store_still_load(tmp_path: Path) -> None:
    np.savez(tmp_path / "old.npz", ids=np.array(["a", "b", "c"]), vectors=VECTORS.astype(np.float64))
    ids, vectors = load_embeddings(tmp_path / "old.npz")
    assert ids == ["a", "b", "c"] and vectors.dtype == np.float32 and read_embeddings(tmp_path / "old.npz").meta is None
    np.testing.assert_array_equal(vectors, VECTORS)


def test_embeddings_arrays_are_what_a_shard_part_and_a_file_hold() -> None:
    arrays = embeddings_arrays(["a"], VECTORS[:1].astype(np.float64), {"fingerprint": "f"})
    assert sorted(arrays) == ["ids", "meta", "vectors"] and arrays["vectors"].dtype == np.float32
    assert "meta" not in embeddings_arrays(["a"], VECTORS[:1], None)


def test_a_file_with_mismatched_ids_is_refused_by_name(tmp_path: Path) -> None:
    write_npz(tmp_path / "bad.npz", {"ids": np.array(["a"]), "vectors": VECTORS})
    with pytest.raises(DataError, match="1 ids for 3 vectors"):
        read_embeddings(tmp_path / "bad.npz")
