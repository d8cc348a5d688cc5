"""Per-query evaluation results (retrieval/evaluation_result.py, evaluate.evaluate_per_query): the metrics come
from the per-query ranks and equal metrics.retrieval_metrics on the same embeddings, item ids survive the
de-duplication of images, and per_query.json round-trips with every metric intact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapters.clip_finetune.data.pairs import CaptionPair
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.errors import DataError
from adapters.clip_finetune.retrieval import evaluate as evaluate_module
from adapters.clip_finetune.retrieval.evaluate import embed_pairs, evaluate, evaluate_per_query
from adapters.clip_finetune.retrieval.evaluation_result import (
    EvaluationResult,
    change_standard_error,
    galleries,
    merge,
    rank_pairs,
)
from adapters.clip_finetune.retrieval.metrics import retrieval_metrics

T2I, I2T = "text_to_image", "image_to_text"
DIM = 16


@pytest.fixture
def noisy_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for the model's towers: each distinct image (by pixels) a random unit vector, each caption a
    noisy copy of the vector of the image it names in its text ("... #n"), so some queries fail."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(64, DIM))
    axes: dict[bytes, int] = {}

    def image_vectors(clip, paths, *args, **kwargs):
        ids = [axes.setdefault(np.asarray(Image.open(p)).tobytes(), len(axes)) for p in paths]
        v = table[ids]
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), list(range(len(paths)))

    def text_vectors(clip, texts, *args, **kwargs):
        v = np.stack([table[int(t.split("#")[1].strip(" ."))] + rng.normal(scale=1.2, size=DIM) for t in texts])
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(evaluate_module, "encode_images", image_vectors)
    monkeypatch.setattr(evaluate_module, "encode_texts", text_vectors)


def _pairs(tmp_path: Path, n: int = 12) -> list[CaptionPair]:
    """n images with two captions each and item ids; image 0 is also stored as a copy under another item id
    (one image after de-duplication), and the text of caption #3 is given in two spellings."""
    pairs = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        render(sample_specs(1, 100 + i)[0]).save(path)
        pairs += [CaptionPair(str(path), f"photo #{i}", f"item-{i}"), CaptionPair(str(path), f"picture #{i}",
                                                                                   f"item-{i}")]
    copy = shutil.copy(tmp_path / "img0.png", tmp_path / "copy-of-img0.png")
    pairs.append(CaptionPair(str(copy), "snapshot #0", "item-copy"))
    pairs.append(CaptionPair(str(tmp_path / "img3.png"), "Photo  #3.", "item-3"))
    return pairs


def test_metrics_equal_retrieval_metrics_on_the_same_embeddings(tmp_path, noisy_model) -> None:
    pairs = _pairs(tmp_path)
    result = evaluate_per_query(None, pairs, progress=False)
    emb = embed_pairs(None, pairs, progress=False)  # the stand-in's captions are noisy: embed again, compare alike
    same = rank_pairs(emb.image_features, emb.text_features, emb.relevance(), emb.image_ids(), emb.captions)
    old = retrieval_metrics(emb.image_features, emb.text_features, emb.text_to_image, relevance=emb.relevance())
    new = EvaluationResult(same, *emb.id_tables()).metrics()
    assert new == old  # exactly: the same ranks, the same arithmetic
    assert set(result.metrics()) == set(old) and 0 < result.metrics()[f"{T2I}/recall@1"] < 1  # some queries fail


def test_every_metric_follows_from_the_per_query_ranks(tmp_path, noisy_model) -> None:
    result = evaluate_per_query(None, _pairs(tmp_path), progress=False)
    m = result.metrics()
    for name in (T2I, I2T):
        rows = result.to_json()[name]
        first = np.array([min(r for _, r in row["relevant"]) for row in rows])
        assert m[f"{name}/mrr"] == pytest.approx(np.mean(1 / first))
        assert m[f"{name}/median_rank"] == pytest.approx(np.median(first))
        recall5 = [sum(r <= 5 for _, r in row["relevant"]) / len(row["relevant"]) for row in rows]
        assert m[f"{name}/recall@5"] == pytest.approx(np.mean(recall5))
        for row in rows:  # the top-k list agrees with the ranks (no ties among these noisy scores)
            relevant = dict(row["relevant"])
            for position, (candidate, _) in enumerate(row["top"], 1):
                assert relevant.get(candidate, position) == position
            assert sum(r <= 10 for r in relevant.values()) == sum(c in relevant for c, _ in row["top"])
            assert len(row["top"]) == 10 and [s for _, s in row["top"]] == sorted((s for _, s in row["top"]),
                                                                                   reverse=True)


def test_item_ids_survive_the_deduplication_of_images(tmp_path, noisy_model) -> None:
    result = evaluate_per_query(None, _pairs(tmp_path), progress=False)
    # the copy of img0 is one image with both paths and both item ids; its id is the first item's
    assert result.images["item-0"] == {"paths": [str(tmp_path / "img0.png"), str(tmp_path / "copy-of-img0.png")],
                                       "items": ["item-0", "item-copy"]}
    assert len(result.images) == 12 and "item-copy" not in result.images
    # a caption written twice is one query, and keeps its item; its relevant image is named by item id
    t2i = {row["query"]: row for row in result.to_json()[T2I]}
    assert "Photo  #3." not in t2i and [i for i, _ in t2i["photo #3"]["relevant"]] == ["item-3"]
    assert result.captions["snapshot #0"] == {"items": ["item-copy"]}
    assert [i for i, _ in t2i["snapshot #0"]["relevant"]] == ["item-0"]
    # image->text queries are the images, by item id; the merged image has its three captions relevant
    i2t = {row["query"]: row for row in result.to_json()[I2T]}
    assert sorted(c for c, _ in i2t["item-0"]["relevant"]) == ["photo #0", "picture #0", "snapshot #0"]


def test_images_without_item_ids_are_named_by_their_path(tmp_path, noisy_model) -> None:
    pairs = [CaptionPair(p.image, p.caption) for p in _pairs(tmp_path, 4)]
    result = evaluate_per_query(None, pairs, progress=False)
    assert list(result.images)[0] == str(tmp_path / "img0.png")
    assert result.images[str(tmp_path / "img0.png")]["items"] == []


def test_per_query_json_round_trips_every_metric(tmp_path, noisy_model) -> None:
    result = evaluate_per_query(None, _pairs(tmp_path), progress=False)
    path = result.write(tmp_path / "per_query.json")
    data = json.loads(path.read_text())
    assert data["metrics"] == result.metrics() and len(data[T2I]) == 25 and len(data[I2T]) == 12
    back = EvaluationResult.read(path)
    assert back.metrics() == result.metrics()
    assert back.to_json()[T2I] == data[T2I]


def test_a_file_that_is_not_a_per_query_evaluation_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "per_query.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="not a readable per-query evaluation"):
        EvaluationResult.read(bad)


def test_evaluate_returns_the_results_metrics(tmp_path, noisy_model, monkeypatch) -> None:
    pairs = _pairs(tmp_path, 5)
    fixed = embed_pairs(None, pairs, progress=False)
    monkeypatch.setattr(evaluate_module, "embed_pairs", lambda *a, **k: fixed)  # the same embeddings twice
    assert evaluate(None, pairs) == evaluate_per_query(None, pairs).metrics()


def _one_relevant(scores: np.ndarray, ids: list[str]) -> EvaluationResult:
    """Text->image over a square score matrix, query i's only relevant image being image i."""
    relevance = np.eye(len(scores), dtype=bool)
    return EvaluationResult(rank_pairs(np.eye(len(scores), dtype=np.float32), scores.astype(np.float32), relevance,
                                       ids, ids), {}, {})


def test_per_query_values_average_to_the_metrics_and_their_change_has_the_paired_standard_error() -> None:
    import statistics

    rng = np.random.default_rng(3)
    n = 40
    ids = [f"q{i}" for i in range(n)]
    old_scores, new_scores = rng.normal(size=(n, n)), rng.normal(size=(n, n)) + np.eye(n)
    old, new = _one_relevant(old_scores, ids), _one_relevant(new_scores, ids)
    for key, value in new.metrics().items():  # every mean over queries is the mean of values()
        got = new.values(key)
        if key.endswith("median_rank"):
            assert got is None
        else:
            assert got is not None and float(got[1].mean()) == pytest.approx(value, abs=1e-12)

    def reciprocal_ranks(scores: np.ndarray) -> list[float]:  # by hand: 1 / (1 + images scored above image i)
        return [1.0 / (1 + int((row > row[i]).sum())) for i, row in enumerate(scores)]

    changes = [a - b for a, b in zip(reciprocal_ranks(new_scores), reciprocal_ranks(old_scores), strict=True)]
    expected = statistics.stdev(changes) / n ** 0.5
    assert change_standard_error(new, old, f"{T2I}/mrr") == pytest.approx(expected, rel=1e-9)
    assert change_standard_error(old, old, f"{T2I}/mrr") == 0.0
    # paired over the queries both ran: a query only one of them has is left out
    fewer = _one_relevant(old_scores[:-1, :-1], ids[:-1])
    kept = [a - b for a, b in zip(reciprocal_ranks(new_scores)[:-1], reciprocal_ranks(old_scores[:-1, :-1]),
                                  strict=True)]
    expected = statistics.stdev(kept) / (n - 1) ** 0.5
    assert change_standard_error(new, fewer, f"{T2I}/mrr") == pytest.approx(expected, rel=1e-9)
    assert change_standard_error(new, old, f"{T2I}/median_rank") is None
    assert change_standard_error(new, _one_relevant(old_scores[:1, :1], ids[:1]), f"{T2I}/mrr") is None


def test_galleries_split_the_images_evenly_and_keep_each_pair_with_its_image() -> None:
    pairs = [CaptionPair(f"img{i % 2500}.png", f"caption {i}") for i in range(3000)]  # 500 images twice
    parts = galleries(pairs, 1000)
    sizes = [len({p.image for p in part}) for part in parts]
    assert sizes == [834, 833, 833]  # three, not 1,000 + 1,000 + 500
    assert sorted(p.caption for part in parts for p in part) == sorted(p.caption for p in pairs)
    homes = {image: i for i, part in enumerate(parts) for image in {p.image for p in part}}
    assert len(homes) == 2500  # no image in two galleries
    assert galleries(pairs[:1000], 1000) == [pairs[:1000]]  # 1,000 images: one gallery, as given


def test_merged_galleries_rank_each_query_within_its_own_and_average_over_all_queries() -> None:
    rng = np.random.default_rng(5)
    ids = [[f"q{i}" for i in range(n)] for n in (30, 20)]
    ids[1][0] = ids[0][0]  # the same caption in both galleries: its id repeats
    parts = [_one_relevant(rng.normal(size=(len(q), len(q))) + np.eye(len(q)), q) for q in ids]
    parts[0].zero_shot, parts[1].zero_shot = {"zero_shot/accuracy": 0.5}, {"zero_shot/accuracy": 0.8}
    parts[0].images, parts[1].images = {f"i{i}": {} for i in range(30)}, {f"j{i}": {} for i in range(20)}
    merged = merge(parts)
    assert merged.zero_shot == {"zero_shot/accuracy": pytest.approx((0.5 * 30 + 0.8 * 20) / 50)}  # by images
    for key, value in merged.metrics().items():
        if key.startswith("zero_shot") or key.endswith("median_rank"):  # the first checked above; a median
            continue
        expected = sum(p.metrics()[key] * len(p.directions[T2I].queries) for p in parts) / 50
        assert value == pytest.approx(expected, abs=1e-12), key
    assert merged.directions[T2I].first_ranks().max() <= 30  # ranked within a gallery, never against all 50
    # the same galleries scored again: paired by position, the repeated id notwithstanding
    again = merge([_one_relevant(rng.normal(size=(len(q), len(q))), q) for q in ids])
    new_q, new_v = again.values(f"{T2I}/mrr")
    _, old_v = merged.values(f"{T2I}/mrr")
    assert len(new_q) == 50
    assert change_standard_error(again, merged, f"{T2I}/mrr") == pytest.approx(
        float(np.std(new_v - old_v, ddof=1) / np.sqrt(50)), rel=1e-12)
