"""Evaluation inside training reuses what it can (retrieval/eval_cache.py) and gives exactly today's numbers:
validation inputs made once (bit-identical tensors), a frozen tower's features computed once, the base model's
embeddings read back from disk by content hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAINING

import adapters.clip_finetune.retrieval.eval_cache as eval_cache
import adapters.clip_finetune.training.loop as loop
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.datasets import ImageDataset
from adapters.clip_finetune.data.decode_cache import InputCache, transform_size
from adapters.clip_finetune.data.load import Splits, load_dataset
from adapters.clip_finetune.data.synthetic import write_dataloop_download
from adapters.clip_finetune.model.clip import load_model
from adapters.clip_finetune.retrieval.eval_cache import BaseEvalStore, EvalCache, frozen_state
from adapters.clip_finetune.retrieval.evaluate import evaluate
from adapters.clip_finetune.training import finetune

TRAINING = {**TINY_TRAINING, "train_batch_size": 32, "batch_size": 64, "num_epochs": 2, "early_stopping": False,
            "checkpoint_every_steps": 0}


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Splits:
    root = tmp_path_factory.mktemp("synthetic")
    write_dataloop_download(root, 64, 48, seed=5)  # 2 steps an epoch: the cache is what is compared
    data, _ = load_dataset(root)
    return Splits(data["train"], data["validation"])


@pytest.fixture(scope="module")
def cfg(tiny_model_config: Path):
    return build_config(TRAINING, {"model_name": str(tiny_model_config)})


def _counting(monkeypatch, name: str) -> list[int]:
    """Count the calls eval_cache makes to encode_images / encode_texts (the real functions still run)."""
    calls: list[int] = []
    real = getattr(eval_cache, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_cache, name, counted)
    return calls


def test_cached_inputs_are_bit_identical_to_fresh_ones_and_the_budget_holds(cfg, splits, tmp_path):
    clip = load_model(cfg)
    images = [p.image for p in splits.validation[:6]]
    side = transform_size(clip.preprocess)
    fresh = ImageDataset([*images, "missing.jpg"], clip.preprocess, side)
    cache = InputCache(clip.preprocess, budget_mb=3.5 * side * side * 3 / 2**20, draft=side)  # room for 3
    cached = ImageDataset([*images, "missing.jpg"], clip.preprocess, side, inputs=cache)
    for _ in range(2):  # the second pass reads what the first kept
        for i in range(len(images)):
            assert torch.equal(cached[i][0], fresh[i][0])
        assert cached[len(images)].reason == "undecodable image"
    assert len(cache) == 3 and cache.used <= cache.budget


def test_evaluation_with_the_cache_equals_evaluation_without_it(cfg, splits, monkeypatch):
    clip = load_model(cfg)
    clip.model.lock_text_tower()
    cache = EvalCache(InputCache(clip.preprocess, 64, transform_size(clip.preprocess)), None)
    texts, images = _counting(monkeypatch, "encode_texts"), _counting(monkeypatch, "encode_images")
    val = splits.validation
    assert evaluate(clip, val, 64, 0, cache=cache) == evaluate(clip, val, 64, 0)
    first = evaluate(clip, val, 64, 0)
    with torch.no_grad():  # a training step's in-place update of the image tower
        proj = clip.model.visual.proj
        proj.add_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(0)) * proj.std())
    after = evaluate(clip, val, 64, 0, cache=cache)
    assert after == evaluate(clip, val, 64, 0) and after != first
    assert len(texts) == 1 and len(images) == 2  # the locked text tower's features were reused
    clip.model.load_state_dict(clip.model.state_dict())  # any write to the text tower: computed afresh
    evaluate(clip, val, 64, 0, cache=cache)
    assert len(texts) == 2


def test_frozen_state_sees_trainable_towers_and_writes(cfg):
    clip = load_model(cfg)
    assert frozen_state(clip.model, "text") is None and frozen_state(clip.model, "image") is None
    clip.model.lock_text_tower()
    before = frozen_state(clip.model, "text")
    optimizer = torch.optim.AdamW([p for p in clip.model.parameters() if p.requires_grad], fused=True)
    clip.model.visual.proj.sum().backward()
    optimizer.step()  # trains the image tower only
    assert before is not None and frozen_state(clip.model, "text") == before
    with torch.no_grad():
        next(clip.model.transformer.parameters()).add_(1)
    assert frozen_state(clip.model, "text") != before


def test_training_with_the_cache_gives_the_same_history_and_reuses_the_text_features(cfg, splits, monkeypatch,
                                                                                       tmp_path):
    locked = build_config(cfg.model_dump(), {"lock_text": True, "base_eval_cache": False})
    texts = _counting(monkeypatch, "encode_texts")
    cached = finetune(locked, splits, progress=False)
    assert len(texts) == 1  # before: computed; both epochs: the locked tower's features reused
    monkeypatch.setattr(loop, "eval_cache_for", lambda c, clip, n: (None, float(c.image_cache_mb)))
    plain = finetune(locked, splits, progress=False)
    assert cached.before == plain.before and cached.after == plain.after
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in cached.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in plain.history]
    # the image tower trained, and each epoch's evaluation saw it (its features were not reused)
    assert all(r["text_to_image/mrr"] != cached.before["text_to_image/mrr"] for r in cached.history)


def test_the_base_evaluation_is_stored_and_read_back_by_content(cfg, splits, monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_FINETUNE_CACHE", str(tmp_path / "cache"))
    one_epoch = build_config(cfg.model_dump(), {"num_epochs": 1})
    first = finetune(one_epoch, splits, progress=False)
    stored = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(stored) == 2  # image and text embeddings of the base model
    texts, images = _counting(monkeypatch, "encode_texts"), _counting(monkeypatch, "encode_images")
    second = finetune(one_epoch, splits, progress=False)
    assert second.before == first.before and second.after == first.after
    assert len(images) == 1 and len(texts) == 1  # the epoch's evaluation only: the base's was read
    other_seed = finetune(build_config(one_epoch.model_dump(), {"seed": 7}), splits, progress=False)
    assert other_seed.before != first.before and len(list((tmp_path / "cache").glob("*.npz"))) == 4


def test_store_keys_follow_the_content_not_the_path(cfg, splits, tmp_path):
    clip = load_model(cfg)
    store = BaseEvalStore(tmp_path)
    src = Path(splits.validation[0].image)
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(src.read_bytes())
    assert store.key(clip, "image", [str(src)], 64) == store.key(clip, "image", [str(copy)], 64)
    key = store.key(clip, "image", [str(copy)], 64)
    copy.write_bytes(Path(splits.validation[1].image).read_bytes())
    assert store.key(clip, "image", [str(copy)], 64) != key
    assert store.key(clip, "text", ["a"], 64) != store.key(clip, "text", ["b"], 64)
    assert store.key(clip, "image", [str(tmp_path / "gone.jpg")], 64) is None
    store.save("k", (np.ones((2, 4), np.float32), [0, 2]))
    vectors, kept = store.load("k")
    assert vectors.shape == (2, 4) and kept == [0, 2] and store.load("absent") is None
    (tmp_path / "bad.npz").write_text("not a zip")
    assert store.load("bad") is None
    assert json.dumps(kept)  # plain ints


def test_shared_budget_validation_inputs_first(cfg):
    clip = load_model(build_config(cfg.model_dump(), {"image_cache_mb": 1}))
    cache, train_mb = eval_cache.eval_cache_for(build_config(cfg.model_dump(), {"image_cache_mb": 1}), clip, 10)
    need = 10 * 64 * 64 * 3 / 2**20
    assert cache.inputs.budget == int(need * 2**20) and train_mb == pytest.approx(1 - need)
    cache, train_mb = eval_cache.eval_cache_for(build_config(cfg.model_dump(), {"image_cache_mb": 0}), clip, 10)
    assert cache.inputs.budget == 0 and train_mb == 0
