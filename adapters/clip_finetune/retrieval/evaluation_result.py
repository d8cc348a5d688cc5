"""An evaluation with its per-query detail: for each direction and each query, the ranks of its relevant
candidates and its top-k candidates with their scores. Every metric is computed from the ranks
(metrics.metrics_from_ranks: the same code as ranking_metrics, so the same numbers), and the result round-trips
through `per_query.json` (written next to a model's metrics.json) with nothing lost that a metric needs.

Ids are the data's own: a caption query is its text (the first spelling of the normalised caption), an image is
the item id of its first pair when the data has item ids, else its first path; `images` maps each image id to
every path and item id that was de-duplicated into it (docs/metrics.md), `captions` each caption to its items.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DIRECTIONS, EVAL_KS
from ..errors import DataError
from ..files import atomic_write
from ..inputs import read_json
from .metrics import RelevantRanks, metrics_from_ranks, per_query_from_ranks, relevant_ranks
from .ranking import top_k

FORMAT = "clip-finetune per-query evaluation v1"
PER_QUERY_NAME = "per_query.json"
TOP_K = 10  # candidates kept per query: enough for recall@10 galleries, small enough for a run folder
MAX_PER_QUERY_BYTES = 1 << 30  # read bound: about 2 million queries of top-10 lists
# A set scored with a tolerance in metric points (the retention set) is ranked in galleries of at most this many
# images, as COCO's "1K" protocol averages five folds of 1,000: a query's rank, so MRR and recall@k, depends on how
# many candidates it is ranked against, and more pairs should buy precision, not a harder task
GALLERY = 1000


@dataclass
class DirectionResult:
    """One direction's queries: ranks of their relevant candidates and their top-k candidates."""

    queries: list[str]  # query ids
    candidates: list[str]  # candidate ids
    ranks: RelevantRanks  # row = query, col = candidate; by query, best rank first
    top_ids: np.ndarray  # [n_queries, k] candidate indices, best first (ranking.top_k: ties in candidate order)
    top_scores: np.ndarray  # [n_queries, k] their cosine similarities

    @classmethod
    def rank(cls, scores: np.ndarray, relevance: np.ndarray, queries: Sequence[str], candidates: Sequence[str],
             top: int = TOP_K) -> DirectionResult:
        """Rank every candidate for every query: scores and relevance [n_queries, n_candidates]."""
        idx, best = top_k(scores, top)
        return cls(list(queries), list(candidates), relevant_ranks(scores, relevance), idx, best)

    @property
    def n_relevant(self) -> np.ndarray:
        return np.bincount(self.ranks.row, minlength=len(self.queries))

    def metrics(self, ks: Sequence[int] = EVAL_KS) -> dict[str, float]:
        return metrics_from_ranks(self.ranks, self.n_relevant, ks)

    def first_ranks(self) -> np.ndarray:
        """[n_queries] the rank of each query's best-ranked relevant candidate (1 = found first)."""
        return self.ranks.rank[self.ranks.nth == 1]

    def query(self, i: int) -> dict[str, Any]:
        """Query i as JSON: its id, its relevant candidates [id, rank] best first, its top-k [id, score]."""
        rows = slice(*np.searchsorted(self.ranks.row, [i, i + 1]))
        relevant = [[self.candidates[c], r] for c, r in zip(self.ranks.col[rows].tolist(),
                                                              self.ranks.rank[rows].tolist(), strict=True)]
        top = [[self.candidates[c], round(s, 6)] for c, s in zip(self.top_ids[i].tolist(),
                                                                  self.top_scores[i].tolist(), strict=True)]
        return {"query": self.queries[i], "relevant": relevant, "top": top}

    def to_json(self) -> list[dict[str, Any]]:
        return [self.query(i) for i in range(len(self.queries))]

    @classmethod
    def from_json(cls, rows: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> DirectionResult:
        index = {c: j for j, c in enumerate(candidates)}
        triples = [(q, index[c], int(r), nth) for q, row in enumerate(rows)
                   for nth, (c, r) in enumerate(sorted(row["relevant"], key=lambda x: x[1]), 1)]
        row, col, rank, nth = (np.array(v, np.int64) for v in zip(*triples, strict=True)) if triples else \
            (np.zeros(0, np.int64),) * 4
        k = max((len(r["top"]) for r in rows), default=0)
        top_ids = np.array([[index[c] for c, _ in r["top"]] for r in rows], np.int64).reshape(len(rows), k)
        top_scores = np.array([[s for _, s in r["top"]] for r in rows], np.float32).reshape(len(rows), k)
        return cls([r["query"] for r in rows], list(candidates), RelevantRanks(row, rank, nth, col), top_ids,
                   top_scores)


@dataclass
class EvaluationResult:
    """Both directions of a retrieval evaluation, per query; `zero_shot`: classification accuracy, when the
    images have two or more class labels (computed by zero_shot.py over the same image embeddings)."""

    directions: dict[str, DirectionResult]  # "text_to_image", "image_to_text"
    images: dict[str, dict[str, list[str]]]  # image id -> {"paths": [...], "items": [...]}
    captions: dict[str, dict[str, list[str]]]  # caption -> {"items": [...]}
    ks: tuple[int, ...] = EVAL_KS
    zero_shot: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Every metric, flat 'direction/metric' keys (as metrics.retrieval_metrics), then zero-shot's."""
        out = {f"{name}/{key}": v for name, d in self.directions.items() for key, v in d.metrics(self.ks).items()}
        return {**out, **self.zero_shot}

    def values(self, metric: str) -> tuple[list[str], np.ndarray] | None:
        """The queries of a 'direction/metric' key and each one's value (their mean is the metric); None for a
        key that is not a mean over queries (median_rank, zero-shot accuracy)."""
        direction, _, key = metric.partition("/")
        if direction not in self.directions or key == "median_rank":
            return None
        d = self.directions[direction]
        values = per_query_from_ranks(d.ranks, d.n_relevant, self.ks).get(key)
        return None if values is None else (d.queries, values)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON: metrics, the id tables and each direction's queries (relevant ranks, top-k)."""
        return {"format": FORMAT, "ks": list(self.ks), "metrics": self.metrics(), "zero_shot": self.zero_shot,
                "images": self.images, "captions": self.captions,
                **{name: d.to_json() for name, d in self.directions.items()}}

    def write(self, path: str | Path) -> Path:
        """Write to_json() atomically (compact: one run's file grows with its queries)."""
        text = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)
        atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
        return Path(path)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationResult:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise DataError(f"not a per-query evaluation (format {FORMAT!r} expected)")
        images, captions = data["images"], data["captions"]
        candidates = {DIRECTIONS[0]: list(images), DIRECTIONS[1]: list(captions)}
        return cls({name: DirectionResult.from_json(data[name], candidates[name]) for name in DIRECTIONS},
                   images, captions, tuple(data["ks"]), dict(data.get("zero_shot") or {}))

    @classmethod
    def read(cls, path: str | Path) -> EvaluationResult:
        """A per_query.json written by write(); DataError naming the file when it is not one."""
        data = read_json(path, MAX_PER_QUERY_BYTES, "per-query evaluation")  # Unreadable names the file
        try:
            return cls.from_json(data)
        except (DataError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{str(path)!r} is not a readable per-query evaluation ({type(e).__name__}: "
                            f"{str(e)[:200]}); evaluate the model again") from None


def rank_pairs(image_features: np.ndarray, text_features: np.ndarray, relevance: np.ndarray,
               image_ids: Sequence[str], captions: Sequence[str], top: int = TOP_K
               ) -> dict[str, DirectionResult]:
    """Both directions over paired embeddings (as metrics.retrieval_metrics: image->text queries are the images
    some caption is relevant to; all images stay text->image candidates). relevance [n_texts, n_images]."""
    dtype = np.result_type(image_features.dtype, text_features.dtype, np.float32)
    sim = text_features.astype(dtype, copy=False) @ image_features.astype(dtype, copy=False).T  # [n_texts, n_images]
    captioned = np.flatnonzero(relevance.any(axis=0))
    return {
        DIRECTIONS[0]: DirectionResult.rank(sim, relevance, captions, image_ids, top),
        DIRECTIONS[1]: DirectionResult.rank(sim.T[captioned], relevance.T[captioned],
                                            [image_ids[i] for i in captioned], captions, top),
    }


def direction_of(metric: str) -> str:
    """The direction a metric key belongs to ('text_to_image/recall@5' -> 'text_to_image'); text->image for
    the others (zero-shot accuracy: search is text->image)."""
    head = metric.split("/", 1)[0]
    return head if head in DIRECTIONS else DIRECTIONS[0]


def change_standard_error(new: EvaluationResult, old: EvaluationResult, metric: str) -> float | None:
    """The standard error of the change of `metric` from `old` to `new`, over the queries both ran: paired (each
    query's own change), so what the two models share cancels, as in a paired t-test. None for a metric that is
    not a mean over queries, or with fewer than two shared queries."""
    got = [r.values(metric) for r in (new, old)]
    if got[0] is None or got[1] is None:
        return None
    (queries, a), (old_queries, b) = got
    if queries == old_queries:  # the same queries in the same order (galleries may repeat an id): by position
        change = a - b
    else:
        index = {q: i for i, q in enumerate(old_queries)}
        shared = [(i, index[q]) for i, q in enumerate(queries) if q in index]
        i, j = np.array(shared, np.int64).reshape(-1, 2).T
        change = a[i] - b[j]
    if len(change) < 2:
        return None
    return float(change.std(ddof=1) / np.sqrt(len(change)))


def galleries(pairs: Sequence[Any], size: int | None = None) -> list[list[Any]]:
    """`pairs` (anything with an `.image`) in the fewest galleries of at most `size` (default GALLERY) distinct
    images, as even as can be (np.array_split of the images in order of first appearance); each pair goes with
    its image."""
    size = GALLERY if size is None else size
    images = list(dict.fromkeys(p.image for p in pairs))
    if len(images) <= size:
        return [list(pairs)]
    fold = {image: i for i, part in enumerate(np.array_split(np.arange(len(images)), -(-len(images) // size)))
            for image in (images[j] for j in part)}
    out: list[list[Any]] = [[] for _ in range(max(fold.values()) + 1)]
    for p in pairs:
        out[fold[p.image]].append(p)
    return out


def merge(results: Sequence[EvaluationResult]) -> EvaluationResult:
    """The galleries' results as one: every query ranked within its own gallery, so each metric is the mean over
    all their queries (zero-shot accuracy: the galleries' accuracies weighted by their images). Ids may repeat
    across galleries (the same caption in two); change_standard_error pairs such results by position."""
    if len(results) == 1:
        return results[0]
    directions = {name: _merge_direction([r.directions[name] for r in results]) for name in DIRECTIONS}
    images: dict[str, dict[str, list[str]]] = {}
    captions: dict[str, dict[str, list[str]]] = {}
    for r in results:
        for table, merged in ((r.images, images), (r.captions, captions)):
            for key, ids in table.items():
                for field_name, values in ids.items():
                    merged.setdefault(key, {}).setdefault(field_name, []).extend(values)
    weights = [len(r.images) for r in results]
    zero_shot = {key: float(np.average([r.zero_shot[key] for r in results], weights=weights))
                 for key in results[0].zero_shot if all(key in r.zero_shot for r in results)}
    return EvaluationResult(directions, images, captions, results[0].ks, zero_shot)


def _merge_direction(parts: Sequence[DirectionResult]) -> DirectionResult:
    """One direction of merge(): queries, candidates and their ranks in gallery order, indices offset."""
    q0 = np.cumsum([0, *(len(d.queries) for d in parts)])
    c0 = np.cumsum([0, *(len(d.candidates) for d in parts)])
    ranks = RelevantRanks(row=np.concatenate([d.ranks.row + q0[i] for i, d in enumerate(parts)]),
                          rank=np.concatenate([d.ranks.rank for d in parts]),
                          nth=np.concatenate([d.ranks.nth for d in parts]),
                          col=np.concatenate([d.ranks.col + c0[i] for i, d in enumerate(parts)]))
    return DirectionResult([q for d in parts for q in d.queries], [c for d in parts for c in d.candidates], ranks,
                           np.concatenate([d.top_ids + c0[i] for i, d in enumerate(parts)]),
                           np.concatenate([d.top_scores for d in parts]))


def compare_queries(new: EvaluationResult, old: EvaluationResult, direction: str = DIRECTIONS[0]) -> dict[str, Any]:
    """Of the queries both evaluations ran in `direction`, how many found their first relevant candidate at a
    better (lower), worse or the same rank with `new` than with `old`."""
    first = [dict(zip(r.directions[direction].queries, r.directions[direction].first_ranks().tolist(), strict=True))
             for r in (new, old)]
    common = first[0].keys() & first[1].keys()
    better = sum(first[0][q] < first[1][q] for q in common)
    worse = sum(first[0][q] > first[1][q] for q in common)
    return {"direction": direction, "compared": len(common), "better": better, "worse": worse,
            "same": len(common) - better - worse}
