"""The per-query ranks every metric is computed from (retrieval/metrics.py: relevant_ranks, metrics_from_ranks):
each relevant candidate's rank under the pessimistic tie rule, by query, on both ranking paths and across
blocks, and metrics_from_ranks giving ranking_metrics' numbers."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.clip_finetune.retrieval import metrics as metrics_module
from adapters.clip_finetune.retrieval.metrics import metrics_from_ranks, ranking_metrics, relevant_ranks


def _reference_ranks(scores: np.ndarray, relevance: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per query, (candidate, rank) best first, straight from the rule: rank = candidates scoring strictly
    higher + irrelevant ones scoring equal + the relevant tied ones placed before it (in column order) + 1."""
    out = []
    for s, rel in zip(scores, relevance, strict=True):
        rows = []
        for c in np.flatnonzero(rel):
            tied_relevant_before = int(((s == s[c]) & rel)[:c].sum())
            rows.append((int(c), int((s > s[c]).sum() + ((s == s[c]) & ~rel).sum() + tied_relevant_before + 1)))
        out.append(sorted(rows, key=lambda x: x[1]))
    return out


@pytest.fixture(params=["sort", "compare"])
def path(request, monkeypatch) -> str:
    monkeypatch.setattr(metrics_module, "_COMPARE_MAX_RELEVANT", 0 if request.param == "sort" else 10**9)
    monkeypatch.setattr(metrics_module, "_BLOCK_ELEMENTS", 40)  # a few queries per block
    return request.param


def test_ranks_and_candidates_of_every_relevant_candidate(path) -> None:
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, size=(12, 9)).astype(np.float32)  # many ties
    relevance = rng.random((12, 9)) < 0.3
    relevance[np.arange(12), rng.integers(0, 9, 12)] = True
    ranks = relevant_ranks(scores, relevance)
    got = [[(int(c), int(r)) for c, r in zip(ranks.col[ranks.row == q], ranks.rank[ranks.row == q], strict=True)]
           for q in range(12)]
    want = _reference_ranks(scores, relevance)
    for q, (g, w) in enumerate(zip(got, want, strict=True)):
        assert [r for _, r in g] == [r for _, r in w]  # the ranks, best first
        # which relevant candidate takes which of the ranks its tie group holds is free; the candidates are not
        assert {c for c, _ in g} == {c for c, _ in w}
        untied = {c for c, _ in w if ((scores[q] == scores[q, c]).sum() == 1)}
        assert {(c, r) for c, r in g if c in untied} == {(c, r) for c, r in w if c in untied}
        assert ranks.nth[ranks.row == q].tolist() == list(range(1, len(w) + 1))
    assert (np.diff(ranks.row) >= 0).all()


def test_metrics_from_ranks_are_ranking_metrics(path) -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(20, 15))
    relevance = rng.random((20, 15)) < 0.2
    relevance[:, 0] = True
    assert metrics_from_ranks(relevant_ranks(scores, relevance), relevance.sum(axis=1)) == \
        ranking_metrics(scores, relevance)
