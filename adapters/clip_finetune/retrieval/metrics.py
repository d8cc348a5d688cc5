"""Retrieval metrics for text->image and image->text search, aware of several captions per image.

Pure numpy. Formulas, the tie rule and the several-captions rule are written out in docs/metrics.md.

Conventions shared by every metric:

* Ranks are 1-based positions in the full ranking of all candidates by descending score.
* Ties are broken pessimistically: a relevant candidate is placed after every irrelevant candidate with an
  equal score, so a model that scores everything equally gets the worst case, never a flattering one.
  (Among relevant candidates tied together the order does not change any metric.)
* R is the number of relevant candidates of a query; every query must have R >= 1.
* Every metric is computed per query, then averaged over queries (median for median_rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..config import AT_K_METRICS, DIRECTIONS, EVAL_KS, RANK_METRICS

# First-relevant-rank statistics; lower is better (every other metric: higher is better).
LOWER_IS_BETTER = ("median_rank", "mean_rank")
SUMMARY_METRICS = (*RANK_METRICS, *LOWER_IS_BETTER)

# Bound on the elements of one block of queries x candidates, so peak memory stays at a few hundred MB.
_BLOCK_ELEMENTS = 1 << 22
# Up to this many relevant candidates per query, ranks come from direct comparisons (cost ~ n_candidates
# per relevant candidate) instead of a full sort (cost ~ n_candidates * log n_candidates per query).
_COMPARE_MAX_RELEVANT = 16


def metric_keys(ks: Sequence[int] = EVAL_KS) -> list[str]:
    """The keys ranking_metrics returns, in its order (without a direction prefix)."""
    return [f"{m}@{k}" for m in AT_K_METRICS for k in ks] + list(SUMMARY_METRICS)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one cut-off")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every cut-off k must be a positive integer (got {k!r})")
    return tuple(int(k) for k in ks)


def _as_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_queries, n_candidates] (got shape {scores.shape})")
    if scores.dtype == np.float16:
        scores = scores.astype(np.float32)  # argsort is slow and cumbersome on half precision
    elif not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)  # also makes negation safe for unsigned integers
    if np.isnan(scores).any():
        # NaN compares unequal to everything: the ranking, and so every metric, would be arbitrary.
        raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN values")
    return scores


def _as_relevance(relevance: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    relevance = np.asarray(relevance)
    if relevance.shape != shape:
        raise ValueError(f"relevance has shape {relevance.shape}; it must match scores {shape}")
    if relevance.dtype != np.bool_:
        if not np.isin(relevance, (0, 1)).all():
            raise ValueError("relevance must be boolean (or 0/1)")
        relevance = relevance.astype(bool)
    return relevance


def _relevant_ranks_sort(
    scores: np.ndarray, relevance: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of the relevant candidates of a block of queries under the pessimistic tie rule, by sorting.

    Returns (row, rank, nth, col): for every relevant candidate, its query row, its 1-based rank, how many
    relevant candidates are ranked at or above it (1 for the best-ranked one), and its column.

    After an argsort by descending score (any order within ties), a relevant candidate at 0-based sorted
    position p inside the tie group (run of equal scores) that ends at position b gets the rank
    b + 1 - |relevant in (p, b]|: the tie group's relevant candidates are packed at its end, behind its
    irrelevant ones, whatever order argsort left them in.
    """
    n_queries, n_candidates = scores.shape
    order = np.argsort(-scores, axis=1)
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    is_end = np.ones(sorted_scores.shape, dtype=bool)
    is_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    flat = np.flatnonzero(np.take_along_axis(relevance, order, axis=1))  # row-major, ascending
    row, pos = np.divmod(flat, n_candidates)
    idx = np.arange(flat.size)
    counts = np.bincount(row, minlength=n_queries)
    nth = idx - (np.cumsum(counts) - counts)[row] + 1
    rank = pos + 1
    # Only relevant candidates inside a tie group of two or more need the tie rule (rare with float scores).
    ends_flat = is_end.ravel()
    in_tie = ~ends_flat[flat] | ((pos > 0) & ~ends_flat[flat - 1])
    if in_tie.any():
        # The last column always ends a group, so no group spans two rows.
        ends = np.flatnonzero(ends_flat)
        tied = flat[in_tie]
        group_end = ends[np.searchsorted(ends, tied)]  # first group end at or after the position
        later_in_group = np.searchsorted(flat, group_end, side="right") - idx[in_tie] - 1
        rank[in_tie] = group_end - row[in_tie] * n_candidates + 1 - later_in_group
    return row, rank, nth, order.ravel()[flat]


def _relevant_ranks_compare(
    scores: np.ndarray, relevance: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Same result as _relevant_ranks_sort, by direct comparisons; fast when queries have few relevant.

    For a relevant candidate with score v: G = |candidates with score >= v|, M = |relevant with score >= v|
    and nth = |relevant with score > v| + its position (1..t) among the t relevant tied at v. Its rank is
    G - M + nth: the tied relevant candidates take ranks G - t + 1 .. G, behind the tied irrelevant ones.
    """
    row, col = np.nonzero(relevance)
    v = scores[row, col]
    counts = np.bincount(row, minlength=scores.shape[0])
    slot = np.arange(row.size) - (np.cumsum(counts) - counts)[row]  # position among the row's relevant
    width = int(counts.max())
    padded = np.zeros((scores.shape[0], width), dtype=scores.dtype)
    valid = np.zeros((scores.shape[0], width), dtype=bool)
    padded[row, slot] = v
    valid[row, slot] = True
    others, others_valid = padded[row], valid[row]  # [n_relevant, width]: the same row's relevant scores
    greater = ((others > v[:, None]) & others_valid).sum(axis=1)
    tied = (others == v[:, None]) & others_valid
    m = greater + tied.sum(axis=1)
    nth = greater + (tied & (np.arange(width) < slot[:, None])).sum(axis=1) + 1
    g = (scores[row] >= v[:, None]).sum(axis=1)
    return row, g - m + nth, nth, col


def ranking_metrics(
    scores: np.ndarray, relevance: np.ndarray, ks: Sequence[int] = EVAL_KS
) -> dict[str, float]:
    """Mean over queries of ranking metrics; several relevant candidates per query allowed.

    scores: [n_queries, n_candidates], higher = better. relevance: same shape, bool.
    R = relevant candidates of the query, hits@k = relevant candidates ranked 1..k, ranks 1-based,
    ties pessimistic (relevant after irrelevant with an equal score). Per query, then averaged:

    * recall@k    = hits@k / R
    * precision@k = hits@k / k              (k, even when k > n_candidates)
    * hit@k       = 1 if hits@k > 0 else 0
    * f1@k        = 2 P R / (P + R)         (P = precision@k, R = recall@k; 0 when both are 0)
    * ndcg@k      = DCG@k / IDCG@k, DCG@k = sum_{i<=k} rel_i / log2(i + 1),
                    IDCG@k = sum_{i=1..min(R,k)} 1 / log2(i + 1)
    * mrr         = 1 / rank of the first relevant candidate (no cut-off)
    * map         = AP = (1/R) sum over relevant candidates c of precision@rank(c) (full ranking)
    * r_precision = precision@R = hits@R / R (full ranking, never a top-k cut)
    * median_rank, mean_rank = median / mean of the rank of the first relevant candidate (lower = better)

    Raises ValueError if a query has no relevant candidate (the message says how many).
    """
    ks = _check_ks(ks)
    scores = _as_scores(scores)
    relevance = _as_relevance(relevance, scores.shape)
    n_queries, n_candidates = scores.shape
    if n_queries == 0 or n_candidates == 0:
        raise ValueError(f"need at least one query and one candidate (got scores of shape {scores.shape})")
    n_relevant = relevance.sum(axis=1)
    empty = int((n_relevant == 0).sum())
    if empty:
        raise ValueError(
            f"{empty} of {n_queries} queries have no relevant candidate; every query needs at least one"
        )

    return metrics_from_ranks(relevant_ranks(scores, relevance), n_relevant, ks)


class _Counts(NamedTuple):
    """Per-query counts under the pessimistic tie rule, from which every metric follows."""

    hits: np.ndarray  # [len(ks), n_queries] relevant candidates ranked 1..k
    dcg: np.ndarray  # [len(ks), n_queries] DCG@k
    ap_sum: np.ndarray  # [n_queries] sum of precision at each relevant candidate's rank
    hits_at_r: np.ndarray  # [n_queries] relevant candidates ranked 1..R
    first_rank: np.ndarray  # [n_queries] rank of the best-ranked relevant candidate


class RelevantRanks(NamedTuple):
    """The rank of every relevant candidate of every query under the pessimistic tie rule, query by query
    (rows ascending; within a row, ranks ascending: the relevant candidates' ranks are all distinct)."""

    row: np.ndarray  # [n_relevant_total] the query
    rank: np.ndarray  # [n_relevant_total] its 1-based rank in the full ranking
    nth: np.ndarray  # [n_relevant_total] relevant candidates ranked at or above it (1 for the best-ranked)
    col: np.ndarray  # [n_relevant_total] the candidate


def relevant_ranks(scores: np.ndarray, relevance: np.ndarray) -> RelevantRanks:
    """Ranks of the relevant candidates of every query (scores and relevance checked as in ranking_metrics),
    computed in blocks of queries so memory stays bounded. Every metric follows from them (metrics_from_ranks)."""
    scores = _as_scores(scores)
    relevance = _as_relevance(relevance, scores.shape)
    n_queries, n_candidates = scores.shape
    max_relevant = int(relevance.sum(axis=1).max()) if n_queries else 0
    compare = max_relevant <= _COMPARE_MAX_RELEVANT
    ranks_of = _relevant_ranks_compare if compare else _relevant_ranks_sort
    # the compare path gathers one score row per relevant candidate
    block = max(1, _BLOCK_ELEMENTS // (max(n_candidates, 1) * (max(max_relevant, 1) if compare else 1)))
    parts = []
    for start in range(0, n_queries, block):
        stop = min(start + block, n_queries)
        row, rank, nth, col = ranks_of(scores[start:stop], relevance[start:stop])
        order = np.lexsort((rank, row))  # by query, then best rank first
        parts.append((row[order] + start, rank[order], nth[order], col[order]))
    if not parts:
        empty = np.zeros(0, np.int64)
        return RelevantRanks(empty, empty, empty, empty)
    return RelevantRanks(*(np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(4)))


def metrics_from_ranks(ranks: RelevantRanks, n_relevant: np.ndarray, ks: Sequence[int] = EVAL_KS
                       ) -> dict[str, float]:
    """Every metric of ranking_metrics from the relevant candidates' ranks (relevant_ranks) and each query's
    count of relevant candidates (every query needs at least one)."""
    values = per_query_from_ranks(ranks, n_relevant, ks)
    return {key: float(np.median(v) if key == "median_rank" else v.mean()) for key, v in values.items()}


def per_query_from_ranks(ranks: RelevantRanks, n_relevant: np.ndarray, ks: Sequence[int] = EVAL_KS
                         ) -> dict[str, np.ndarray]:
    """Each metric's value for each query [n_queries], under the keys of metric_keys: a metric is their mean
    (median_rank their median; its values and mean_rank's are the first relevant ranks)."""
    ks = _check_ks(ks)
    n_relevant = np.asarray(n_relevant)
    n_queries = len(n_relevant)
    row, rank, nth = ranks.row, ranks.rank, ranks.nth
    c = _Counts(np.zeros((len(ks), n_queries)), np.zeros((len(ks), n_queries)), np.zeros(n_queries),
                np.zeros(n_queries), np.zeros(n_queries))
    r_of_row = n_relevant[row]
    top = rank <= max(ks)  # the log only where some DCG@k needs it
    top_row, top_rank = row[top], rank[top]
    discount = 1.0 / np.log2(top_rank + 1.0)
    for i, k in enumerate(ks):
        c.hits[i] = np.bincount(row, weights=rank <= k, minlength=n_queries)
        c.dcg[i] = np.bincount(top_row, weights=(top_rank <= k) * discount, minlength=n_queries)
    # precision at a relevant candidate's own rank = (relevant ranked at or above it) / rank
    c.ap_sum[:] = np.bincount(row, weights=nth / rank, minlength=n_queries)
    c.hits_at_r[:] = np.bincount(row, weights=rank <= r_of_row, minlength=n_queries)
    # exactly one relevant candidate per row has nth == 1 (its best-ranked); rows come in order
    c.first_rank[:] = rank[nth == 1]
    return _per_query(c, n_relevant, ks)


def _per_query(c: _Counts, n_relevant: np.ndarray, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Each metric per query from the counts."""
    n_queries = len(n_relevant)
    r = n_relevant.astype(np.float64)
    # ideal DCG: the min(R, k) relevant candidates at ranks 1..min(R, k)
    ideal = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(2, max(ks) + 2)))))
    out: dict[str, np.ndarray] = {}
    for i, k in enumerate(ks):
        precision = c.hits[i] / k
        recall = c.hits[i] / r
        denom = precision + recall
        out[f"recall@{k}"] = recall
        out[f"precision@{k}"] = precision
        out[f"hit@{k}"] = (c.hits[i] > 0).astype(np.float64)
        out[f"f1@{k}"] = np.divide(2 * precision * recall, denom, out=np.zeros(n_queries), where=denom > 0)
        out[f"ndcg@{k}"] = c.dcg[i] / ideal[np.minimum(n_relevant, k)]
    out["mrr"] = 1.0 / c.first_rank
    out["map"] = c.ap_sum / r
    out["r_precision"] = c.hits_at_r / r
    out["median_rank"] = out["mean_rank"] = c.first_rank
    return {key: out[key] for key in metric_keys(ks)}


def retrieval_metrics(
    image_features: np.ndarray,
    text_features: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = EVAL_KS,
    *,
    relevance: np.ndarray | None = None,
) -> dict[str, float]:
    """Text->image and image->text metrics of paired embeddings (similarity = dot product).

    image_features [n_images, d] and text_features [n_texts, d] are assumed L2-normalised;
    text_to_image [n_texts] is the index of the image each caption describes (several captions may share
    an image). `relevance` [n_texts, n_images] (bool), when given, says instead which images each text is
    relevant to (several: duplicate-aware evaluation, docs/metrics.md). Returns "text_to_image/<metric>"
    (queries = texts, candidates = all images) and "image_to_text/<metric>" (queries = images with at least
    one relevant text, candidates = all texts, relevant = every text relevant to the image). Images that no
    text is relevant to stay text->image distractors. Metric definitions: ranking_metrics.
    """
    images = np.asarray(image_features)
    texts = np.asarray(text_features)
    if images.ndim != 2 or texts.ndim != 2:
        raise ValueError(
            f"features must be 2-D (got image_features {images.shape}, text_features {texts.shape})"
        )
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image and text features differ in dimension ({images.shape[1]} vs {texts.shape[1]})"
        )
    n_images, n_texts = images.shape[0], texts.shape[0]
    if relevance is None:
        relevance = _owner_relevance(text_to_image, n_images, n_texts)
    else:
        relevance = _as_relevance(relevance, (n_texts, n_images))
    if n_texts == 0:
        raise ValueError("need at least one text")

    dtype = np.result_type(images.dtype, texts.dtype, np.float32)
    sim = texts.astype(dtype, copy=False) @ images.astype(dtype, copy=False).T  # [n_texts, n_images]
    out = {f"{DIRECTIONS[0]}/{key}": v for key, v in ranking_metrics(sim, relevance, ks).items()}
    captioned = np.flatnonzero(relevance.any(axis=0))  # images no text is relevant to would have no answer
    i2t = ranking_metrics(sim.T[captioned], relevance.T[captioned], ks)
    out.update({f"{DIRECTIONS[1]}/{key}": v for key, v in i2t.items()})
    return out


def _owner_relevance(text_to_image: np.ndarray, n_images: int, n_texts: int) -> np.ndarray:
    """[n_texts, n_images] relevance of one owner image per text, after checking the owners."""
    owner = np.asarray(text_to_image)
    if owner.shape != (n_texts,):
        raise ValueError(f"text_to_image must have shape ({n_texts},) (got {owner.shape})")
    if n_texts and not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices (got dtype {owner.dtype})")
    owner = owner.astype(np.int64)
    bad = (owner < 0) | (owner >= n_images)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} text_to_image entries are outside [0, {n_images}) "
            f"(e.g. text {int(np.flatnonzero(bad)[0])} -> {int(owner[bad][0])})"
        )
    relevance = np.zeros((n_texts, n_images), dtype=bool)
    relevance[np.arange(n_texts), owner] = True
    return relevance
