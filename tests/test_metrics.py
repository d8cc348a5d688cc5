"""Retrieval metrics: hand-computed cases, the pessimistic tie rule, several captions per image, and a
brute-force reference implementation written with plain loops."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
import pytest
from helpers import REPO

from adapters.clip_finetune.config import metric_names
from adapters.clip_finetune.retrieval import metrics as metrics_module
from adapters.clip_finetune.retrieval.formatting import DEFAULT_TABLE_METRICS, format_table
from adapters.clip_finetune.retrieval.metrics import metric_keys, ranking_metrics, retrieval_metrics


@pytest.fixture(params=["sort", "compare"])
def rank_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through each of the two rank computations (full sort / direct comparisons)."""
    monkeypatch.setattr(metrics_module, "_COMPARE_MAX_RELEVANT", 0 if request.param == "sort" else 10**9)
    return request.param


def brute_force(scores: np.ndarray, relevance: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Reference implementation: one query at a time, straight from the definitions in docs/metrics.md."""
    per_query: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        per_query.setdefault(name, []).append(value)

    first_ranks = []
    for score_row, rel_row in zip(scores.tolist(), relevance.tolist(), strict=True):
        n = len(score_row)
        # Python's sort is stable; the key puts relevant (True) after irrelevant (False) on equal scores.
        ranking = sorted(range(n), key=lambda c, s=score_row, r=rel_row: (-s[c], r[c]))
        rels = [bool(rel_row[c]) for c in ranking]  # rels[i - 1]: is the candidate at rank i relevant
        n_rel = sum(rels)
        for k in ks:
            hits = sum(rels[:k])
            p, r = hits / k, hits / n_rel
            add(f"recall@{k}", r)
            add(f"precision@{k}", p)
            add(f"hit@{k}", 1.0 if hits else 0.0)
            add(f"f1@{k}", 2 * p * r / (p + r) if p + r else 0.0)
            dcg = sum(1 / math.log2(i + 1) for i in range(1, min(k, n) + 1) if rels[i - 1])
            idcg = sum(1 / math.log2(i + 1) for i in range(1, min(n_rel, k) + 1))
            add(f"ndcg@{k}", dcg / idcg)
        first = next(i for i in range(1, n + 1) if rels[i - 1])
        first_ranks.append(first)
        add("mrr", 1 / first)
        add("map", sum(sum(rels[:i]) / i for i in range(1, n + 1) if rels[i - 1]) / n_rel)
        add("r_precision", sum(rels[:n_rel]) / n_rel)
    out = {name: sum(v) / len(v) for name, v in per_query.items()}
    out["median_rank"] = float(statistics.median(first_ranks))
    out["mean_rank"] = sum(first_ranks) / len(first_ranks)
    return out


def one_query(relevant_ranks: Sequence[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores n, n-1, ..., 1 (candidate i has rank i + 1) with the given 1-based ranks relevant."""
    scores = np.arange(n, 0, -1, dtype=float)[None, :]
    relevance = np.zeros((1, n), dtype=bool)
    relevance[0, [r - 1 for r in relevant_ranks]] = True
    return scores, relevance


# ---------------------------------------------------------------------------------------------------
# ranking_metrics: hand-computed cases


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        (
            1,
            {
                "recall@1": 1, "precision@1": 1, "hit@1": 1, "f1@1": 1, "ndcg@1": 1,
                # P@5 = 1/5, R@5 = 1 -> F1 = 2 * 0.2 * 1 / 1.2 = 1/3
                "recall@5": 1, "precision@5": 0.2, "hit@5": 1, "f1@5": 1 / 3, "ndcg@5": 1,
                "mrr": 1, "map": 1, "r_precision": 1, "median_rank": 1, "mean_rank": 1,
            },
        ),
        (
            3,
            {
                "recall@1": 0, "precision@1": 0, "hit@1": 0, "f1@1": 0, "ndcg@1": 0,
                # DCG@5 = 1/log2(3 + 1) = 0.5; IDCG@5 = 1/log2(2) = 1
                "recall@5": 1, "precision@5": 0.2, "hit@5": 1, "f1@5": 1 / 3, "ndcg@5": 0.5,
                # AP = (1/R) * P@3 = 1/3; R-precision = P@1 = 0
                "mrr": 1 / 3, "map": 1 / 3, "r_precision": 0, "median_rank": 3, "mean_rank": 3,
            },
        ),
    ],
)
def test_one_relevant_item(rank: int, expected: dict[str, float], rank_path: str) -> None:
    scores, relevance = one_query([rank], n=5)
    assert ranking_metrics(scores, relevance, ks=(1, 5)) == pytest.approx(expected)


def test_several_relevant_items_at_ranks_1_3_4_of_5(rank_path: str) -> None:
    scores, relevance = one_query([1, 3, 4], n=5)  # R = 3
    got = ranking_metrics(scores, relevance, ks=(1, 3, 5))
    log2 = math.log2
    idcg3 = 1 / log2(2) + 1 / log2(3) + 1 / log2(4)  # min(R, k) = 3 ideal positions for k = 3 and 5
    expected = {
        # top 1 holds 1 relevant
        "recall@1": 1 / 3, "precision@1": 1 / 1, "hit@1": 1, "f1@1": 2 * 1 * (1 / 3) / (1 + 1 / 3),
        # top 3 holds ranks 1 and 3
        "recall@3": 2 / 3, "precision@3": 2 / 3, "hit@3": 1, "f1@3": 2 / 3,
        # top 5 holds all 3: P = 3/5, R = 1, F1 = 2 * 0.6 / 1.6 = 0.75
        "recall@5": 3 / 3, "precision@5": 3 / 5, "hit@5": 1, "f1@5": 0.75,
        "ndcg@1": (1 / log2(2)) / (1 / log2(2)),
        "ndcg@3": (1 / log2(2) + 1 / log2(4)) / idcg3,
        "ndcg@5": (1 / log2(2) + 1 / log2(4) + 1 / log2(5)) / idcg3,
        "mrr": 1 / 1,
        # AP = (P@1 + P@3 + P@4) / R = (1/1 + 2/3 + 3/4) / 3 = 29/36
        "map": (1 / 1 + 2 / 3 + 3 / 4) / 3,
        # R-precision = P@3 = 2/3
        "r_precision": 2 / 3,
        "median_rank": 1, "mean_rank": 1,
    }
    assert got == pytest.approx(expected)
    assert got["map"] == pytest.approx(29 / 36)
    # the standard discount: rank 2 is discounted (log2(3)), unlike the variant whose first two are not
    scores2, relevance2 = one_query([2], n=3)
    assert ranking_metrics(scores2, relevance2, ks=(2,))["ndcg@2"] == pytest.approx(1 / math.log2(3))


def test_mean_and_median_over_queries(rank_path: str) -> None:
    scores = np.tile(np.arange(6, 0, -1, dtype=float), (3, 1))
    relevance = np.zeros((3, 6), dtype=bool)
    relevance[0, 0] = relevance[1, 1] = relevance[2, 5] = True  # first relevant at ranks 1, 2, 6
    got = ranking_metrics(scores, relevance, ks=(1,))
    assert got["median_rank"] == 2
    assert got["mean_rank"] == pytest.approx((1 + 2 + 6) / 3)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 6) / 3)
    assert got["recall@1"] == pytest.approx(1 / 3)


def test_precision_divides_by_k_even_beyond_the_candidates(rank_path: str) -> None:
    scores, relevance = one_query([1, 2], n=3)
    got = ranking_metrics(scores, relevance, ks=(10,))
    assert got["precision@10"] == pytest.approx(2 / 10)
    assert got["recall@10"] == 1
    assert got["ndcg@10"] == pytest.approx(1.0)  # IDCG uses min(R, k) = 2 positions


# ---------------------------------------------------------------------------------------------------
# ties: pessimistic


@pytest.mark.parametrize(("n", "relevant"), [(4, 0), (4, 3), (7, 2), (1, 0)])
def test_all_scores_equal_is_the_worst_case(n: int, relevant: int, rank_path: str) -> None:
    scores = np.zeros((1, n))
    relevance = np.zeros((1, n), dtype=bool)
    relevance[0, relevant] = True
    got = ranking_metrics(scores, relevance, ks=(1,))
    assert got["mean_rank"] == n
    assert got["mrr"] == pytest.approx(1 / n)
    assert got["recall@1"] == (1.0 if n == 1 else 0.0)


def test_all_equal_with_two_relevant_takes_the_last_ranks(rank_path: str) -> None:
    relevance = np.array([[True, False, True, False]])
    got = ranking_metrics(np.ones((1, 4)), relevance, ks=(2, 4))
    # relevant at ranks 3 and 4: AP = (1/3 + 2/4) / 2 = 5/12; R-precision = P@2 = 0
    assert got["map"] == pytest.approx(5 / 12)
    assert got["r_precision"] == 0
    assert got["recall@2"] == 0
    assert got["mean_rank"] == 3
    assert got["ndcg@4"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


@pytest.mark.parametrize("relevant_column", [1, 2])
def test_tie_between_relevant_and_irrelevant(relevant_column: int, rank_path: str) -> None:
    scores = np.array([[0.9, 0.5, 0.5, 0.1]])
    relevance = np.zeros((1, 4), dtype=bool)
    relevance[0, relevant_column] = True
    got = ranking_metrics(scores, relevance, ks=(2, 3))
    # whichever column it sits in, the relevant one goes behind the tied irrelevant one: rank 3, not 2
    assert got["mean_rank"] == 3
    assert got["hit@2"] == 0
    assert got["hit@3"] == 1
    assert got["mrr"] == pytest.approx(1 / 3)


def test_ties_among_relevant_only_cost_nothing(rank_path: str) -> None:
    relevance = np.array([[False, True, True, False]])
    got = ranking_metrics(np.array([[1.0, 0.5, 0.5, 0.0]]), relevance, ks=(3,))
    # ranks 2 and 3 whatever the order between them: AP = (1/2 + 2/3) / 2 = 7/12
    assert got["map"] == pytest.approx(7 / 12)
    assert got["recall@3"] == 1
    assert got["r_precision"] == pytest.approx(1 / 2)


# ---------------------------------------------------------------------------------------------------
# ranking_metrics against the brute force


@pytest.mark.parametrize(
    ("seed", "shape", "integer_scores", "density"),
    [
        (0, (1, 1), False, 1.0),
        (1, (5, 7), False, 0.3),
        (2, (20, 13), True, 0.3),  # scores in 0..3: many ties, mixed relevant and irrelevant
        (3, (17, 40), True, 0.1),
        (4, (30, 9), False, 0.8),
        (5, (8, 50), True, 0.05),
        (6, (40, 25), True, 1.0),  # everything relevant
    ],
)
def test_matches_brute_force(
    seed: int, shape: tuple[int, int], integer_scores: bool, density: float, rank_path: str
) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, shape).astype(np.float32) if integer_scores else rng.normal(size=shape)
    relevance = rng.random(shape) < density
    relevance[np.arange(shape[0]), rng.integers(0, shape[1], shape[0])] = True  # every query answerable
    ks = (1, 3, 10)  # 10 can exceed the number of candidates
    got = ranking_metrics(scores, relevance, ks)
    expected = brute_force(scores, relevance, ks)
    assert list(got) == metric_keys(ks)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_candidate_order_does_not_matter(rank_path: str) -> None:
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 3, (25, 30)).astype(float)
    relevance = rng.random((25, 30)) < 0.2
    relevance[:, 0] = True
    perm = rng.permutation(30)
    # equal up to the order of floating-point sums
    expected = ranking_metrics(scores, relevance)
    assert ranking_metrics(scores[:, perm], relevance[:, perm]) == pytest.approx(expected, rel=1e-12)


def test_blocks_give_the_same_result(monkeypatch: pytest.MonkeyPatch, rank_path: str) -> None:
    rng = np.random.default_rng(8)
    scores = rng.integers(0, 5, (37, 11)).astype(float)
    relevance = rng.random((37, 11)) < 0.3
    relevance[:, 3] = True
    whole = ranking_metrics(scores, relevance)
    monkeypatch.setattr(metrics_module, "_BLOCK_ELEMENTS", 25)  # a few queries per block
    assert ranking_metrics(scores, relevance) == pytest.approx(whole, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# ranking_metrics: errors


def test_queries_without_relevant_candidates_are_an_error() -> None:
    relevance = np.ones((5, 4), dtype=bool)
    relevance[[1, 3]] = False
    with pytest.raises(ValueError, match=r"2 of 5 queries have no relevant candidate"):
        ranking_metrics(np.zeros((5, 4)), relevance)


@pytest.mark.parametrize(
    ("scores", "relevance", "ks", "message"),
    [
        (np.zeros((2, 3)), np.ones((2, 4), dtype=bool), (1,), "shape"),
        (np.zeros(3), np.ones(3, dtype=bool), (1,), "2-D"),
        (np.array([[0.0, np.nan]]), np.ones((1, 2), dtype=bool), (1,), "NaN"),
        (np.zeros((1, 2)), np.array([[0, 2]]), (1,), "boolean"),
        (np.zeros((1, 2)), np.ones((1, 2), dtype=bool), (0,), "positive integer"),
        (np.zeros((1, 2)), np.ones((1, 2), dtype=bool), (), "at least one"),
        (np.zeros((0, 2)), np.ones((0, 2), dtype=bool), (1,), "at least one query"),
    ],
)
def test_bad_input_is_an_error(
    scores: np.ndarray, relevance: np.ndarray, ks: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ranking_metrics(scores, relevance, ks)


def test_integer_relevance_is_accepted() -> None:
    scores, relevance = one_query([2], n=3)
    assert ranking_metrics(scores, relevance.astype(int)) == ranking_metrics(scores, relevance)


# ---------------------------------------------------------------------------------------------------
# retrieval_metrics


def unit(rows: list[list[float]]) -> np.ndarray:
    a = np.array(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_keys_are_metric_names() -> None:
    rng = np.random.default_rng(0)
    images, texts = unit(rng.normal(size=(4, 8)).tolist()), unit(rng.normal(size=(6, 8)).tolist())
    owner = np.array([0, 0, 1, 2, 3, 3])
    assert list(retrieval_metrics(images, texts, owner)) == metric_names()
    assert list(retrieval_metrics(images, texts, owner, ks=(1, 2))) == metric_names((1, 2))


def test_image_to_text_counts_every_caption(rank_path: str) -> None:
    images = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    texts = unit([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]])
    owner = np.array([0, 0, 1, 2])  # image 0 has two captions
    got = retrieval_metrics(images, texts, owner, ks=(1, 2))
    # image 0 ranks its captions 1 (score 1) and 2 (score 0.8): recall@1 = 1/2, recall@2 = 2/2;
    # images 1 and 2 have one caption each, ranked first: recall@1 = 1
    assert got["image_to_text/recall@1"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert got["image_to_text/recall@2"] == 1
    assert got["image_to_text/hit@1"] == 1
    assert got["image_to_text/precision@2"] == pytest.approx((2 / 2 + 1 / 2 + 1 / 2) / 3)
    assert got["image_to_text/map"] == 1
    assert got["image_to_text/r_precision"] == 1
    # text 1 scores image 0 (0.8) above image 1 (0.6): every text finds its image first
    assert got["text_to_image/recall@1"] == 1
    assert got["text_to_image/mean_rank"] == 1


def test_perfect_embedding(rank_path: str) -> None:
    rng = np.random.default_rng(3)
    images = unit(rng.normal(size=(30, 16)).tolist())
    owner = rng.integers(0, 30, 80)
    got = retrieval_metrics(images, images[owner], owner)
    for key in ("recall@1", "mrr", "map", "ndcg@10", "r_precision"):
        assert got[f"text_to_image/{key}"] == pytest.approx(1.0)
    assert got["text_to_image/median_rank"] == 1
    # image -> text: all captions of an image tie at score 1, and ties among relevant cost nothing
    for key in ("hit@1", "mrr", "map", "r_precision", "recall@10"):
        assert got[f"image_to_text/{key}"] == pytest.approx(1.0)


def test_uncaptioned_image_is_only_a_distractor(rank_path: str) -> None:
    images = unit([[0.6, 0, 0.8], [0, 1, 0], [0.8, 0.6, 0]])  # image 2 has no caption
    texts = unit([[1, 0, 0], [0, 1, 0]])
    got = retrieval_metrics(images, texts, np.array([0, 1]), ks=(1,))
    # text 0 prefers image 2 (0.8) to its own image 0 (0.6): rank 2
    assert got["text_to_image/mean_rank"] == pytest.approx((2 + 1) / 2)
    assert got["text_to_image/recall@1"] == pytest.approx(1 / 2)
    # only images 0 and 1 are image->text queries, each finding its caption first
    assert got["image_to_text/mean_rank"] == 1


def test_retrieval_equals_ranking_on_the_similarity_matrix() -> None:
    rng = np.random.default_rng(5)
    images = unit(rng.normal(size=(12, 6)).tolist())
    texts = unit(rng.normal(size=(20, 6)).tolist())
    owner = rng.integers(0, 12, 20)
    sim = texts @ images.T
    rel = np.zeros((20, 12), dtype=bool)
    rel[np.arange(20), owner] = True
    got = retrieval_metrics(images, texts, owner, ks=(1, 5))
    t2i = brute_force(sim, rel, (1, 5))
    captioned = np.unique(owner)
    i2t = brute_force(sim.T[captioned], rel.T[captioned], (1, 5))
    expected = {f"text_to_image/{k}": v for k, v in t2i.items()} | {f"image_to_text/{k}": v for k, v in i2t.items()}
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("n_images", "dim_text", "owner", "message"),
    [
        (3, 4, [0, 3], "outside"),
        (3, 4, [0, -1], "outside"),
        (3, 5, [0, 1], "dimension"),
        (3, 4, [0, 1, 2], "shape"),
        (3, 4, [0.0, 1.0], "integer"),
    ],
)
def test_retrieval_bad_input(n_images: int, dim_text: int, owner: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(np.ones((n_images, 4)), np.ones((2, dim_text)), np.array(owner))


# ---------------------------------------------------------------------------------------------------
# format_table

BEFORE = {"text_to_image/recall@1": 0.1234, "text_to_image/median_rank": 12.34, "image_to_text/mrr": 0.5}
AFTER = {"text_to_image/recall@1": 0.4567, "text_to_image/median_rank": 3.0, "image_to_text/mrr": 0.625}


def test_format_table_before_and_after() -> None:
    table = format_table(BEFORE, AFTER)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "before", "after", "change"]
    recall = next(line for line in lines if "recall@1" in line)
    assert recall.split() == ["recall@1", "0.123", "0.457", "+0.333"]
    rank = next(line for line in lines if line.strip().startswith("median_rank"))
    assert rank.split() == ["median_rank", "12.3", "3.0", "-9.3"]  # ranks: one decimal
    mrr = next(line for line in lines if line.strip().startswith("mrr"))
    assert mrr.split() == ["mrr", "0.500", "0.625", "+0.125"]
    # grouped: each direction heading comes before its rows
    assert lines.index("text_to_image") < lines.index(recall) < lines.index("image_to_text") < lines.index(mrr)
    assert "lower is better" in table


def test_format_table_before_only() -> None:
    table = format_table(BEFORE)
    assert table.splitlines()[0].split() == ["metric", "before"]
    assert "after" not in table and "change" not in table
    assert "0.123" in table and "12.3" in table


def test_format_table_default_rows_of_full_results() -> None:
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(10, 8)).tolist())
    owner = np.repeat(np.arange(10), 2)
    result = retrieval_metrics(images, unit(rng.normal(size=(20, 8)).tolist()), owner)
    table = format_table(result, result)
    rows = [line.split()[0] for line in table.splitlines()[2:] if line.startswith("  ")]
    n_default = len(DEFAULT_TABLE_METRICS)
    assert rows == list(DEFAULT_TABLE_METRICS) * 2  # a curated set, not every key
    assert n_default < len(metric_names()) // 2
    assert "+0.000" in table
    assert max(len(line) for line in table.splitlines()) <= 80  # fits a terminal


def test_format_table_explicit_metrics_and_bare_keys() -> None:
    table = format_table(BEFORE, AFTER, metrics=["mrr", "text_to_image/recall@1"])
    assert "median_rank" not in table
    assert "mrr" in table and "recall@1" in table
    scores, relevance = one_query([2], n=4)
    bare = format_table(ranking_metrics(scores, relevance))  # ranking_metrics keys have no direction
    assert "text_to_image" not in bare
    assert next(line for line in bare.splitlines() if line.startswith("mrr")).split() == ["mrr", "0.500"]


def test_format_table_missing_values() -> None:
    table = format_table(BEFORE, {"text_to_image/recall@1": 0.5})
    mrr = next(line for line in table.splitlines() if line.strip().startswith("mrr"))
    assert mrr.split() == ["mrr", "0.500", "-", "-"]
    with pytest.raises(ValueError, match="recal@1"):
        format_table(BEFORE, metrics=["recal@1"])
    with pytest.raises(ValueError):
        format_table(None, None)


# ---------------------------------------------------------------------------------------------------
# scale and dependencies


@pytest.mark.parametrize("density", [0.001, 0.5])
def test_large_matrices_are_fast(density: float) -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((2000, 2000)).astype(np.float32)
    relevance = rng.random((2000, 2000)) < density
    relevance[:, 0] = True
    start = time.perf_counter()
    ranking_metrics(scores, relevance)
    # ~0.5 s on two busy cores; a cubic algorithm would take minutes
    assert time.perf_counter() - start < 20


def test_metrics_imports_no_torch() -> None:
    code = ("import sys, adapters.clip_finetune.retrieval.metrics; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'dtlpy')))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
