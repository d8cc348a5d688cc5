"""The exact index (retrieval/exact_index.py) behind the Index protocol (retrieval/index.py): add, replace and
remove by id, exact search, save and load through the embeddings store, open_index picking the implementation
from what is on disk, and the provenance check refusing another model's vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_MODEL, TINY_TRAINING

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.errors import DataError
from adapters.clip_finetune.model.clip import load_model
from adapters.clip_finetune.retrieval import index as index_module
from adapters.clip_finetune.retrieval.exact_index import ExactIndex
from adapters.clip_finetune.retrieval.index import Index, open_index, register
from adapters.clip_finetune.retrieval.provenance import check_index, made_by
from adapters.clip_finetune.retrieval.shards import ShardSpec, embed_shard


def _unit(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _filled(n: int = 6) -> ExactIndex:
    index = ExactIndex(8, {"kind": "images", "model": "m", "model_sha256": "abc"})
    index.add([f"item-{i}" for i in range(n)], _unit(n))
    return index


def test_it_is_an_index_and_search_finds_each_stored_vector_first() -> None:
    index = _filled()
    assert isinstance(index, Index) and index.kind == "exact" and index.dim == 8 and len(index) == 6
    assert index.describe() == "exact index (6 vectors, every one scored)"
    ids, scores = index.search(_unit(6), 3)
    assert [row[0] for row in ids] == index.ids()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_search_scores_every_vector_exactly() -> None:
    index, queries = _filled(50), _unit(7, seed=3)
    ids, scores = index.search(queries, 50)
    brute = queries @ _unit(50).T
    for q in range(7):
        assert [int(i.split("-")[1]) for i in ids[q]] == np.argsort(-brute[q], kind="stable").tolist()
    np.testing.assert_allclose(scores, -np.sort(-brute, axis=1), atol=1e-6)


def test_adding_a_stored_id_replaces_its_vector_in_place_and_new_ids_append() -> None:
    index = _filled(3)
    new = _unit(2, seed=9)
    index.add(["item-1", "item-9"], new)
    assert index.ids() == ["item-0", "item-1", "item-2", "item-9"] and len(index) == 4
    np.testing.assert_array_equal(index.vectors[1], new[0])
    assert index.search(new[:1], 1)[0] == [["item-1"]]
    index.add(["twice", "twice"], _unit(2, seed=5))  # an id given twice keeps its last vector, stored once
    assert index.ids().count("twice") == 1
    np.testing.assert_array_equal(index.vectors[-1], _unit(2, seed=5)[1])


def test_remove_drops_the_ids_keeps_the_order_and_counts_only_stored_ones() -> None:
    index = _filled(5)
    kept = index.vectors[[0, 2, 4]].copy()
    assert index.remove(["item-1", "item-3", "never-stored"]) == 2
    assert index.ids() == ["item-0", "item-2", "item-4"]
    np.testing.assert_array_equal(index.vectors, kept)
    assert all("item-1" not in row for row in index.search(_unit(5), 5)[0])
    index.add(["item-1"], _unit(1))  # an id removed can come back
    assert index.ids()[-1] == "item-1"


@pytest.mark.parametrize(("ids", "vectors", "message"), [
    (["a"], np.ones((1, 4), np.float32), "8-d"),
    (["a", "b"], np.ones((1, 8), np.float32), "one 8-d vector per id"),
    (["a"], np.full((1, 8), np.nan, np.float32), "NaN"),
])
def test_add_refuses_vectors_that_do_not_fit(ids, vectors, message) -> None:
    with pytest.raises(DataError, match=message):
        ExactIndex(8).add(ids, vectors)


def test_save_then_load_keeps_ids_vectors_and_provenance_and_numpy_reads_it(tmp_path: Path) -> None:
    index = _filled()
    path = index.save(tmp_path / "photos.npz")
    loaded = ExactIndex.load(path)
    assert loaded.ids() == index.ids() and loaded.meta["model_sha256"] == "abc" and loaded.meta["kind"] == "images"
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    np.testing.assert_array_equal(np.load(path)["vectors"], index.vectors)  # the README's promise
    opened = open_index(path)
    assert isinstance(opened, ExactIndex) and opened.ids() == index.ids()


def test_open_index_reads_a_plain_npz_made_elsewhere_and_a_sharded_folder(tmp_path: Path) -> None:
    np.savez(tmp_path / "plain.npz", ids=np.array(["x", "y"]), vectors=np.eye(2, 8, dtype=np.float32))
    plain = open_index(tmp_path / "plain.npz")
    assert plain.ids() == ["x", "y"] and plain.meta is None
    clip = load_model(build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL), "seed": 0}), "cpu")
    texts = ["a red circle", "a blue square", "a green ring"]
    for shard in range(2):
        embed_shard(clip, "texts", texts, tmp_path / "sharded", ShardSpec(shard, 2, "test"), progress=False)
    sharded = open_index(tmp_path / "sharded")
    assert sharded.kind == "exact" and sharded.ids() == texts and sharded.meta["kind"] == "texts"
    assert sharded.search(sharded.vectors[2:3], 1)[0] == [["a green ring"]]


def test_open_index_gives_a_path_to_the_implementation_that_claims_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(index_module, "_OPENERS", [])
    marker = tmp_path / "ann-index"
    marker.mkdir()
    register("fake", lambda p: p.name == "ann-index", lambda p: _filled(2))
    assert open_index(marker).ids() == ["item-0", "item-1"]
    _filled(3).save(tmp_path / "e.npz")
    assert len(open_index(tmp_path / "e.npz")) == 3  # not claimed: the embeddings store, exact


def test_open_index_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_index(tmp_path / "nowhere.npz")


def test_provenance_check_refuses_another_models_vectors_unless_allowed(caplog) -> None:
    cfg = {**TINY_TRAINING, "model_name": str(TINY_MODEL)}
    ours, other = (load_model(build_config({**cfg, "seed": s}), "cpu") for s in (0, 7))
    index = ExactIndex(ours.embed_dim, made_by(other, "images"))
    index.add(["a"], _unit(1, ours.embed_dim))
    with pytest.raises(DataError, match="other weights"):
        check_index(index, "photos.npz", ours, "images")
    check_index(index, "photos.npz", ours, "images", allow=True)  # logged, not refused
    assert "searching anyway" in caplog.text
    index.meta = made_by(ours, "images")
    check_index(index, "photos.npz", ours, "images")  # its own vectors pass
    index.meta = made_by(ours, "texts")
    with pytest.raises(DataError, match="holds texts vectors"):
        check_index(index, "photos.npz", ours, "images")
