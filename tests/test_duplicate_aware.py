"""Duplicates are not misses: evaluation keys images by content and lets images sharing a caption share its
relevance (docs/metrics.md), the sampler spreads them over batches, and the Python API keeps a PIL image given
with several captions whole. The loss that keeps such pairs out of each other's negatives: test_loss.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAINING
from PIL import Image

from adapters.clip_finetune.api import fit
from adapters.clip_finetune.data.datasets import epoch_batches, spread_duplicates
from adapters.clip_finetune.data.identity import dense_ids, normalise_caption, pair_keys
from adapters.clip_finetune.data.pairs import CaptionPair
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.retrieval import evaluate as evaluate_module
from adapters.clip_finetune.retrieval.evaluate import evaluate
from adapters.clip_finetune.retrieval.metrics import retrieval_metrics

T2I, I2T = "text_to_image", "image_to_text"


# ------------------------------------------------------------------------------------------ evaluation
@pytest.fixture
def perfect_model(monkeypatch: pytest.MonkeyPatch):
    """evaluate() with a perfect model: each distinct image (by pixels) is a unit axis, each caption the normalised
    sum of the axes of the images it truly describes (`truth`: caption -> image names)."""
    truth: dict[str, list[str]] = {}
    axes: dict[bytes, int] = {}

    def image_vectors(clip, paths, *args, **kwargs):
        ids = [axes.setdefault(np.asarray(Image.open(p)).tobytes(), len(axes)) for p in paths]
        return np.eye(16, dtype=np.float32)[ids], list(range(len(paths)))

    def text_vectors(clip, texts, *args, **kwargs):
        out = np.zeros((len(texts), 16), np.float32)
        for row, text in zip(out, texts, strict=True):
            for name in truth[text]:
                row[axes[np.asarray(Image.open(name)).tobytes()]] = 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    monkeypatch.setattr(evaluate_module, "encode_images", image_vectors)
    monkeypatch.setattr(evaluate_module, "encode_texts", text_vectors)
    return truth


def _png(path: Path, seed: int) -> str:
    render(sample_specs(1, seed)[0]).save(path)
    return str(path)


def test_two_products_sharing_a_title_are_both_right_answers(tmp_path, perfect_model) -> None:
    shirt_a, shirt_b, cap = (_png(tmp_path / f"{n}.png", s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    perfect_model.update({"Blue cotton shirt": [shirt_a, shirt_b], "blue cotton  shirt.": [shirt_a, shirt_b],
                          "a red cap": [cap]})
    pairs = [CaptionPair(shirt_a, "Blue cotton shirt"), CaptionPair(shirt_b, "blue cotton  shirt."),
             CaptionPair(cap, "a red cap")]
    m = evaluate(None, pairs)
    # image->text: each shirt's caption is at rank 1 (the two spellings are one caption, relevant to both)
    assert m[f"{I2T}/recall@1"] == m[f"{I2T}/mrr"] == 1.0
    # text->image: "blue cotton shirt" has two right answers, both ranked first; recall@1 = 1/R = 1/2 for that
    # query by its formula (one of two relevant images fits in the top 1), hit@1 and MRR are 1
    assert m[f"{T2I}/hit@1"] == m[f"{T2I}/mrr"] == m[f"{T2I}/map"] == m[f"{T2I}/r_precision"] == 1.0
    assert m[f"{T2I}/recall@1"] == pytest.approx((0.5 + 1.0) / 2) and m[f"{T2I}/recall@5"] == 1.0
    # the old rule (each caption relevant to its own image only) scored this perfect model as a miss
    old = retrieval_metrics(np.eye(3), np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]]) / [[2**0.5], [2**0.5], [1]],
                            np.array([0, 1, 2]))
    assert old[f"{I2T}/recall@1"] < 1 and old[f"{I2T}/mrr"] < 1


def test_one_photo_under_two_paths_is_one_image(tmp_path, perfect_model) -> None:
    photo = _png(tmp_path / "photo.png", 4)
    copy = shutil.copy(photo, tmp_path / "copy-of-photo.png")
    other = _png(tmp_path / "other.png", 5)
    perfect_model.update({"a photo": [photo], "the same photo": [photo], "another": [other]})
    m = evaluate(None, [CaptionPair(photo, "a photo"), CaptionPair(str(copy), "the same photo"),
                        CaptionPair(other, "another")])
    # text->image: each caption finds its photo first (as two paths, the copy tied with it and came first)
    assert m[f"{T2I}/recall@1"] == m[f"{T2I}/mrr"] == 1.0
    # image->text: the photo has both captions at ranks 1-2 (recall@1 = 1/2 by its formula: R = 2)
    assert m[f"{I2T}/hit@1"] == m[f"{I2T}/map"] == m[f"{I2T}/recall@5"] == 1.0


def test_captions_are_normalised_for_identity() -> None:
    assert normalise_caption("  A Red\tcircle. ") == normalise_caption("a red circle") == "a red circle"
    assert normalise_caption("ＡＢＣ") == "abc"  # full-width letters (NFKC)
    assert normalise_caption("a red circle") != normalise_caption("a red square")


def test_the_api_keeps_a_pil_image_with_several_captions_whole(tmp_path, tiny_model_config) -> None:
    specs = sample_specs(12, seed=6, captions_per_image=3)
    images = [render(s) for s in specs]
    pairs = [(im, c) for im, s in zip(images, specs, strict=True) for c in s.captions]
    run = fit(model=tiny_model_config, train_data=pairs, eval_data=pairs, runs_dir=tmp_path, wait=True,
              **{**TINY_TRAINING, "train_batch_size": 12, "num_epochs": 1, "drop_train_overlap": False})
    assert len(list((run.path / "data" / "train").glob("*.png"))) == 12  # one file per image object, not 36
    with np.load(run.path / "examples" / "before.npz") as d:
        # evaluated as 12 images with 3 captions each (captions that two images share counted once)
        assert len(d["images"]) == 12 and len(d["captions"]) == len({normalise_caption(c) for _, c in pairs})
        assert len(d["relevant"]) == 36
    assert run.metrics()["before"][f"{I2T}/recall@10"] > 0


# ------------------------------------------------------------------------------------------- the sampler
def test_unique_batches_spread_shared_images_and_captions_and_keep_every_pair() -> None:
    rng = np.random.default_rng(0)
    images = np.repeat(np.arange(60), 5)  # 60 images x 5 captions
    captions = rng.integers(0, 200, size=300)
    order = spread_duplicates(rng.permutation(300).tolist(), 32, images, captions)
    assert sorted(order) == list(range(300))

    def clashes(batches: list[list[int]]) -> int:  # pairs whose image or caption is already in their batch
        return sum(2 * len(b) - len(set(images[b].tolist())) - len(set(captions[b].tolist())) for b in batches)

    spread = clashes([order[b:b + 32] for b in range(0, 288, 32)])
    plain = clashes([[i for _, i in b] for b in epoch_batches(300, 32, seed=0, epoch=1)])
    assert spread <= 2 and plain > 20, (spread, plain)  # 60 images suffice for 32 distinct per batch


def test_unique_batches_still_fill_batches_when_a_caption_is_shared_by_a_whole_class() -> None:
    captions = np.arange(100) % 3  # three label captions: a batch of 16 cannot avoid repeats
    batches = epoch_batches(100, 16, 0, 1, (np.arange(100), captions))
    assert len(batches) == 100 // 16 and all(len(b) == 16 for b in batches)


def test_pair_keys_follow_content_and_normalised_caption(tmp_path) -> None:
    a = _png(tmp_path / "a.png", 1)
    b = shutil.copy(a, tmp_path / "b.png")
    c = _png(tmp_path / "c.png", 2)
    images, captions = pair_keys([CaptionPair(a, "A dog."), CaptionPair(str(b), "a cat"), CaptionPair(c, "a dog")])
    assert images.tolist() == [0, 0, 1] and captions.tolist() == [0, 1, 0]
    assert dense_ids(["b", "a", "b"]).tolist() == [0, 1, 0]
