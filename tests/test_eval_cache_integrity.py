"""The base model's stored evaluation (retrieval/eval_cache.BaseEvalStore) trusts no file it finds: a file under
the right name with other content, a damaged, forged or hostile file is a miss (one warning, computed afresh); the
key covers every input of preprocessing; pruning deletes only the store's own files; and an image's content key
follows a file rewritten with its old size and mtime (issue 24)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
from helpers import TINY_TRAINING, deadline, png_bytes
from PIL import Image

import adapters.clip_finetune.retrieval.eval_cache as eval_cache
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.identity import content_key, linked_groups
from adapters.clip_finetune.data.pairs import CaptionPair
from adapters.clip_finetune.model.clip import load_model
from adapters.clip_finetune.retrieval.embed import encode_images
from adapters.clip_finetune.retrieval.eval_cache import BaseEvalStore, EvalCache


@pytest.fixture(scope="module")
def clip(tiny_model_config: Path):
    return load_model(build_config(TINY_TRAINING, {"model_name": str(tiny_model_config)}))


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    paths = []
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(png_bytes(colour))
        paths.append(str(path))
    return paths


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == eval_cache.__name__]


def test_a_file_under_the_right_key_with_other_content_is_recomputed(clip, images, tmp_path, caplog):
    store = BaseEvalStore(tmp_path / "cache")
    cache = EvalCache(None, store)
    with cache.storing():
        fresh = cache.images(clip, images, 8, 0)
        key = store.key(clip, "image", images, 8)
    other = [*images[1:], images[0]]
    with cache.storing():
        other_key = store.key(clip, "image", other, 8)
    assert other_key != key
    # another evaluation's file copied under this key: "before" would be another model's numbers
    shutil.copy(store.path(key), store.path(other_key))
    with cache.storing():
        got = cache.images(clip, other, 8, 0)
    expected = encode_images(clip, other, 8, 0, progress=False)
    assert np.array_equal(got[0], expected[0]) and not np.array_equal(got[0], fresh[0])
    assert len(_warnings(caplog)) == 1 and "another key" in _warnings(caplog)[0]
    # the file now holds the right content again, and is read back without a word
    caplog.clear()
    assert np.array_equal(store.load(other_key, 3, clip.embed_dim)[0], expected[0]) and not _warnings(caplog)


def _save_raw(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_changed_truncated_misshapen_and_out_of_range_files_are_misses(tmp_path, caplog):
    store = BaseEvalStore(tmp_path)
    vectors, kept = np.ones((2, 4), np.float32), [0, 2]
    store.save("k", (vectors, kept))
    good = store.load("k", 3, 4)
    assert np.array_equal(good[0], vectors) and good[1] == kept
    raw = dict(np.load(store.path("k")))
    cases = {
        "changed": {**raw, "vectors": raw["vectors"] * 2},
        "shape": {**raw, "vectors": np.ones((2, 4, 1), np.float32)},
        "rows": {**raw, "kept": np.array([0], np.int64)},
        "range": {**raw, "kept": np.array([0, 7], np.int64)},
        "negative": {**raw, "kept": np.array([-1, 0], np.int64)},
        "order": {**raw, "kept": np.array([2, 0], np.int64)},
    }
    for name, arrays in cases.items():
        caplog.clear()
        _save_raw(store.path(name), **{**arrays, "key": np.array(name)})
        assert store.load(name, 3, 4) is None, name
        assert len(_warnings(caplog)) == 1, name
    assert store.load("k", 3, 8) is None  # another model's width
    whole = store.path("k").read_bytes()
    store.path("cut").write_bytes(whole[: len(whole) // 2])
    caplog.clear()
    assert store.load("cut", 3, 4) is None and len(_warnings(caplog)) == 1
    assert store.load("absent", 3, 4) is None


def test_a_fifo_and_a_compression_bomb_in_the_cache_folder_are_bounded_misses(tmp_path, caplog):
    store = BaseEvalStore(tmp_path)
    os.mkfifo(store.path("fifo"))
    with deadline(10, "loading a FIFO from the evaluation cache"):
        assert store.load("fifo", 3, 4) is None
    # 64 MB of zeros deflates to ~64 kB: np.load would inflate it whole; 3 vectors of 4 floats need 48 bytes
    with zipfile.ZipFile(store.path("bomb"), "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in {"vectors": np.zeros((1 << 22, 4), np.float32), "kept": np.arange(3),
                            "key": np.array("bomb"), "digest": np.array("x")}.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array)
    assert store.path("bomb").stat().st_size < 1 << 20
    caplog.clear()
    assert store.load("bomb", 3, 4) is None
    assert len(_warnings(caplog)) == 1 and "would take" in _warnings(caplog)[0]


def test_the_key_covers_the_pixel_limit_and_the_pad_fill_colour(clip, images, tmp_path, monkeypatch):
    store = BaseEvalStore(tmp_path)
    key = store.key(clip, "image", images, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert store.key(clip, "image", images, 8) != key
    monkeypatch.undo()
    size = clip.preprocess.transforms[0].size
    black = dataclasses.replace(clip, preprocess=open_clip.image_transform(size, False, resize_mode="longest"))
    white = dataclasses.replace(clip, preprocess=open_clip.image_transform(size, False, resize_mode="longest",
                                                                         fill_color=255))
    assert repr(black.preprocess) == repr(white.preprocess)  # what the key held before: the same for both
    assert store.key(black, "image", images, 8) != store.key(white, "image", images, 8)
    assert store.key(black, "image", images, 8) == BaseEvalStore(tmp_path).key(black, "image", images, 8)


def test_pruning_deletes_only_the_stores_own_files(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_cache, "STORE_KEEP", 2)
    (tmp_path / "mine.npz").write_bytes(b"a user's embeddings")
    (tmp_path / "base-eval-folder.npz").mkdir()
    store = BaseEvalStore(tmp_path)
    for i in range(4):
        store.save(f"k{i}", (np.ones((1, 4), np.float32), [0]))
        os.utime(store.path(f"k{i}"), ns=(i * 10**9, i * 10**9))
    store.save("k4", (np.ones((1, 4), np.float32), [0]))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["base-eval-folder.npz", "base-eval-k3.npz", "base-eval-k4.npz", "mine.npz"]
    assert (tmp_path / "mine.npz").read_bytes() == b"a user's embeddings"


def test_a_file_rewritten_with_its_old_size_and_mtime_gets_a_new_content_key(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes((200, 10, 10)))
    twin = tmp_path / "b.png"
    twin.write_bytes(png_bytes((10, 200, 10)))
    assert path.stat().st_size == twin.stat().st_size  # same size: only the content differs
    st = path.stat()
    old = content_key(str(path))
    pairs = [CaptionPair(str(path), "one"), CaptionPair(str(twin), "two")]
    assert len(set(linked_groups(pairs))) == 2
    staged = tmp_path / "staged.png"  # cp -p: the other content, with the old mtime
    shutil.copy2(twin, staged)
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(staged, path)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert content_key(str(path)) != old and content_key(str(path)) == content_key(str(twin))
    assert len(set(linked_groups(pairs))) == 1  # now one picture: the grouping sees it
    # in place, same inode: the ctime still moves
    path.write_bytes(png_bytes((200, 10, 10)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_key(str(path)) == old
