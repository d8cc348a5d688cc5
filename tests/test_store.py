"""The one embeddings store (retrieval/store.py): write_npz is the single .npz writer (embeddings files, shard
parts, a run's example embeddings), files stay readable by plain numpy, files written before it still load, what
is read is checked; .npz and .parquet keep their ids, vectors and maker; a sharded folder of parts joins in input
order, and a missing part is an error that names its shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_MODEL, TINY_TRAINING

from adapters.clip_finetune.cli.advice import cli_message
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.errors import DataError
from adapters.clip_finetune.model.clip import load_model
from adapters.clip_finetune.retrieval.exact_index import ExactIndex
from adapters.clip_finetune.retrieval.search import search_texts
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


MAKER = {"kind": "texts", "model": "m", "model_sha256": "abc"}


def test_an_embeddings_file_records_its_maker_and_search_checks_k(tmp_path: Path) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    clip = load_model(cfg, "cpu")
    save_embeddings(tmp_path / "e.npz", ["a"], np.ones((1, 64), np.float32), MAKER)
    read = read_embeddings(tmp_path / "e.npz")
    assert read.ids == ["a"] and read.meta["kind"] == "texts" and read.meta["model_sha256"] == "abc"
    for k in (0, -38):
        with pytest.raises(DataError, match="k must be"):
            search_texts(clip, ExactIndex.from_embeddings(read), ["q"], k)


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_an_embeddings_file_reads_back_exactly(tmp_path: Path, suffix: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
    ids = ["a", "b/c.png", "ü"]
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float64)  # stored as float32
    read = read_embeddings(save_embeddings(tmp_path / f"e{suffix}", ids, vectors, MAKER))
    assert read.ids == ids and read.vectors.dtype == np.float32
    np.testing.assert_array_equal(read.vectors, vectors.astype(np.float32))
    assert {k: read.meta[k] for k in MAKER} == MAKER and read.meta["dim"] == 5 and read.meta["count"] == 3
    assert read_embeddings(save_embeddings(tmp_path / f"plain{suffix}", ids, vectors)).meta is None


def _part(folder: Path, index: int, count: int, ids: list[str], fingerprint: str = "job") -> None:
    """One part of a sharded embedding as shards.py writes it: ids, vectors and a JSON meta."""
    meta = {"fingerprint": fingerprint, "count": len(ids), "dim": 4, **MAKER}
    vectors = np.full((len(ids), 4), index, np.float32)
    np.savez(folder / f"part-{index:05d}-of-{count:05d}.npz", ids=np.asarray(ids, dtype=str), vectors=vectors,
             meta=np.asarray(json.dumps(meta)))


def test_a_sharded_folder_joins_its_parts_in_order_and_names_a_missing_one(tmp_path: Path) -> None:
    for i, ids in ((2, ["e"]), (0, ["a", "b"]), (1, [])):  # written out of order; one shard had no inputs
        _part(tmp_path, i, 3, ids)
    ids, vectors = load_embeddings(tmp_path)
    assert ids == ["a", "b", "e"] and vectors[:, 0].tolist() == [0, 0, 2]
    (tmp_path / "part-00001-of-00003.npz").unlink()
    missing = r"1 of 3 parts missing: shard 1 \(part-00001-of-00003.npz\).*num_shards=3 shard_index=I"
    with pytest.raises(DataError, match=missing) as e:
        load_embeddings(tmp_path)
    said = cli_message(e.value)  # the command line's words for the same advice
    assert "`clip-finetune embed` again" in said and "--num-shards 3 --shard-index I" in said
    _part(tmp_path, 1, 3, ["c"], fingerprint="another job")
    with pytest.raises(DataError, match="part-00001-of-00003.npz.* does not belong with the other parts"):
        load_embeddings(tmp_path)


def test_a_missing_or_damaged_embeddings_file_says_how_to_make_it_in_each_faces_words(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    for name, says in (("missing.npz", "does not exist; create it with"), ("bad.npz", "embed the items again with")):
        with pytest.raises(DataError, match=f"{says} the embed use case$") as e:  # the Python API's words
            read_embeddings(tmp_path / name)
        assert cli_message(e.value).endswith(f"{says} `clip-finetune embed`")  # the command line's
