"""retrieval.failures: the queries that got worse or still fail after fine-tuning, with their top images before and
after (failures.json beside the model), and the report's gallery of them (escaped; a real browser:
test_report.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapters.clip_finetune.cli.gallery import render_gallery
from adapters.clip_finetune.retrieval.evaluation_result import PER_QUERY_NAME, EvaluationResult, rank_pairs
from adapters.clip_finetune.retrieval.failures import BEFORE_NAME, FAILURES_NAME, failure_gallery


def _evaluation(first_ranks: list[int], n_images: int = 12) -> EvaluationResult:
    """Query q ('query q', relevant to image q) ranks its image at first_ranks[q]: scores fall with the image
    index, except the query's own image, placed just below the image at rank first_ranks[q] - 1."""
    n = len(first_ranks)
    scores = np.tile(np.linspace(1.0, 0.0, n_images, dtype=np.float32), (n, 1))
    for q, r in enumerate(first_ranks):
        others = [i for i in range(n_images) if i != q]
        scores[q, q] = 1.5 if r == 1 else (scores[q, others[r - 2]] + scores[q, others[r - 1]]) / 2
    relevance = np.zeros((n, n_images), bool)
    relevance[np.arange(n), np.arange(n)] = True
    # features whose dot products are these scores: texts = scores, images = the identity
    images, captions = [f"img{i}" for i in range(n_images)], [f"query {q}" for q in range(n)]
    directions = rank_pairs(np.eye(n_images, dtype=np.float32), scores, relevance, images, captions)
    tables = {i: {"paths": [f"/data/{i}.png"], "items": []} for i in images}
    return EvaluationResult(directions, tables, {c: {"items": []} for c in captions})


def test_worse_and_still_failing_queries_are_found_ranked_and_bounded() -> None:
    before = [1, 2, 3, 9, 8, 1, 2, 7]
    after = [4, 1, 6, 11, 7, 2, 2, 9]  # 0 falls out of the top 5 (1 -> 4 stays in), 2 falls out: 3 -> 6 ...
    gallery = failure_gallery(_evaluation(before), _evaluation(after), k=3, shown=3)
    first = {e["query"]: (e["rank_before"], e["rank_after"]) for e in gallery["worse"]}
    assert gallery["counts"] == {"queries": 8, "worse": 5, "fell_out_of_top_k": 2, "still_failing": 1,
                                 "failing_after": 5, "better": 2, "fixed": 0}
    # those that fell out of the top 3 first (1 -> 4 fell 4x, 3 -> 6 2x), then by how far: 9 -> 11 < 1 -> 2 (2x)
    assert [e["query"] for e in gallery["worse"]] == ["query 0", "query 2", "query 5"]
    assert first["query 0"] == (1, 4) and gallery["k"] == 3 and gallery["shown"] == 3
    assert [(e["query"], e["rank_after"]) for e in gallery["still_failing"]] == [("query 4", 7)]
    entry = gallery["worse"][0]
    assert entry["relevant"] == ["img0"] and len(entry["top_before"]) == len(entry["top_after"]) == 3
    assert entry["top_before"][0][0] == "img0" and "img0" not in [c for c, _ in entry["top_after"]]
    assert gallery["images"]["img0"] == "/data/img0.png"  # every shown id with a path, for the thumbnails


def test_queries_only_one_evaluation_ran_are_left_out() -> None:
    gallery = failure_gallery(_evaluation([1, 1, 1]), _evaluation([2, 2]), k=1)
    assert gallery["counts"]["queries"] == 2 and gallery["counts"]["fell_out_of_top_k"] == 2


def test_a_training_run_writes_the_gallery_of_its_base_and_saved_model(trained_model) -> None:
    folder = trained_model.folder
    gallery = json.loads((folder / FAILURES_NAME).read_text())
    before, after = (EvaluationResult.read(folder / name) for name in (BEFORE_NAME, PER_QUERY_NAME))
    metrics = json.loads((folder / "metrics.json").read_text())
    n = gallery["counts"]["queries"]
    assert n == len(after.directions["text_to_image"].queries) > 0
    # the counts agree with the run's own metrics: hit@5 is the share of queries with a wanted image in the top 5
    assert 1 - gallery["counts"]["failing_after"] / n == pytest.approx(metrics["after"]["text_to_image/hit@5"])
    assert before.metrics()["text_to_image/mrr"] == pytest.approx(metrics["before"]["text_to_image/mrr"])
    ranks = {q: dict(zip(r.directions["text_to_image"].queries, r.directions["text_to_image"].first_ranks().tolist(),
                         strict=True)) for q, r in (("before", before), ("after", after))}
    assert gallery["counts"]["worse"] == sum(ranks["after"][q] > ranks["before"][q] for q in ranks["after"])
    for entry in gallery["worse"]:
        assert (entry["rank_before"], entry["rank_after"]) == (ranks["before"][entry["query"]],
                                                               ranks["after"][entry["query"]])
        assert all(ident in gallery["images"] for ident, _ in entry["top_after"])


def test_the_gallery_html_escapes_every_value_and_survives_a_planted_file() -> None:
    script = "<script>alert(1)</script>"
    planted = {"counts": {"queries": script, "worse": 3}, "k": script, "images": {script: script},
               "worse": [{"query": script, "rank_before": script, "rank_after": [script], "relevant": [script, {}],
                          "top_before": [[script, script], "x", [1]], "top_after": script}, "not an entry"],
               "still_failing": script}
    page = render_gallery(planted, lambda path: "data:image/jpeg;base64,AA" if path == script else "")
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "Queries that got worse: 3 (the 1 worst shown" in page and "Queries still failing: 0" in page
