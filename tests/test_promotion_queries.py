"""The promotion gate (dataloop/promotion.py) computes its comparison from both models' per-query evaluations:
the metric decides, and the verdict also counts the queries the new model ranks better or worse."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from adapters.clip_finetune.dataloop import promotion
from adapters.clip_finetune.retrieval.evaluation_result import EvaluationResult, compare_queries, rank_pairs

IMAGES, CAPTIONS = ["a.png", "b.png", "c.png", "d.png"], ["cat", "dog", "owl", "fox"]


def _result(text_features: np.ndarray) -> EvaluationResult:
    """Caption i is relevant to image i; images are the unit axes."""
    images = np.eye(4, dtype=np.float32)
    text = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    return EvaluationResult(rank_pairs(images, text.astype(np.float32), np.eye(4, dtype=bool), IMAGES, CAPTIONS),
                            {}, {})


# the old model finds cat and dog first, owl second, fox last; the new one fixes owl and fox, loses dog
OLD = _result(np.array([[1, 0, 0, 0], [0.1, 1, 0, 0], [0.9, 0, 0.5, 0], [0.9, 0.8, 0.7, 0.1]]))
NEW = _result(np.array([[1, 0, 0, 0], [0.9, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))


def _model(model_id: str) -> Any:
    return SimpleNamespace(id=model_id, name=f"model {model_id}", metadata={}, update=lambda **kw: None,
                           metrics=SimpleNamespace(create=lambda **kw: True), dataset_id="ds")


def _adapter_for(results: dict[str, EvaluationResult]):
    def adapter_for(model: Any) -> Any:
        adapter = SimpleNamespace(evaluation={}, evaluation_result=None)

        def evaluate(model: Any, dataset: Any, filters: Any) -> Any:
            adapter.evaluation_result = results[model.id]
            adapter.evaluation = adapter.evaluation_result.metrics()
            return model
        adapter.evaluate = evaluate
        return adapter
    return adapter_for


def test_compare_queries_counts_each_querys_first_relevant_rank() -> None:
    assert compare_queries(NEW, OLD) == {"direction": "text_to_image", "compared": 4, "better": 2, "worse": 1,
                                         "same": 1}
    assert compare_queries(OLD, OLD)["same"] == 4


def test_the_verdict_records_the_metric_and_the_queries_that_moved() -> None:
    new, old = _model("new"), _model("old")
    verdict = promotion.gate(_adapter_for({"new": NEW, "old": OLD}), new, old, SimpleNamespace(id="ds", name="d"),
                             None, metric="text_to_image/mrr")
    assert verdict.new == NEW.metrics() and verdict.previous == OLD.metrics()
    assert verdict.promoted == (NEW.metrics()["text_to_image/mrr"] > OLD.metrics()["text_to_image/mrr"])
    assert verdict.queries == {"direction": "text_to_image", "compared": 4, "better": 2, "worse": 1, "same": 1}
    assert "text_to_image queries: 2 better, 1 worse, 1 the same" in verdict.summary()
    recorded = new.metadata["user"]["clip_finetune"]["promotion"]
    assert recorded["queries"]["worse"] == 1 and recorded["promoted"] == verdict.promoted


def test_without_a_previous_model_there_is_nothing_to_compare_per_query() -> None:
    new = _model("new")
    verdict = promotion.gate(_adapter_for({"new": NEW}), new, None, SimpleNamespace(id="ds", name="d"), None)
    assert verdict.promoted and verdict.queries == {} and "queries" not in verdict.summary()
