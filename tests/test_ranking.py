"""The one ranking (retrieval/ranking.py): top-k best first, ties in candidate order, blockwise dot products
that rank exactly as the full score matrix does."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.clip_finetune.retrieval import ranking
from adapters.clip_finetune.retrieval.ranking import top_k, top_k_by_dot


def test_top_k_orders_best_first_and_keeps_item_order_on_ties() -> None:
    idx, scores = top_k(np.array([[0.1, 0.9, 0.5, 0.9, 0.2]]), 3)
    assert idx.tolist() == [[1, 3, 2]] and scores.tolist() == [[0.9, 0.9, 0.5]]
    assert top_k(np.array([[0.3, 0.1]]), 10)[0].tolist() == [[0, 1]]  # k beyond the items


def test_top_k_agrees_with_a_full_stable_sort() -> None:
    scores = np.random.default_rng(0).integers(0, 5, size=(40, 30)).astype(np.float32)  # many ties
    idx, top = top_k(scores, 7)
    full = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    assert idx.tolist() == full.tolist()
    np.testing.assert_array_equal(top, np.take_along_axis(scores, full, axis=1))


@pytest.mark.parametrize("block_elements", [1, 50, 1 << 24])
def test_top_k_by_dot_ranks_as_the_whole_score_matrix(monkeypatch, block_elements) -> None:
    monkeypatch.setattr(ranking, "BLOCK_ELEMENTS", block_elements)  # one query per block .. all at once
    rng = np.random.default_rng(1)
    queries, vectors = rng.normal(size=(9, 8)).astype(np.float32), rng.normal(size=(25, 8)).astype(np.float32)
    idx, scores = top_k_by_dot(queries, vectors, 4)
    want_idx, want_scores = top_k(queries @ vectors.T, 4)
    assert idx.tolist() == want_idx.tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)


def test_top_k_by_dot_over_no_vectors_returns_empty_rows() -> None:
    idx, scores = top_k_by_dot(np.ones((3, 4), np.float32), np.zeros((0, 4), np.float32), 5)
    assert idx.shape == scores.shape == (3, 0)
