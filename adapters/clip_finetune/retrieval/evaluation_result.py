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
from .metrics import RelevantRanks, metrics_from_ranks, relevant_ranks
from .ranking import top_k

FORMAT = "clip-finetune per-query evaluation v1"
PER_QUERY_NAME = "per_query.json"
TOP_K = 10  # candidates kept per query: enough for recall@10 galleries, small enough for a run folder
MAX_PER_QUERY_BYTES = 1 << 30  # read bound: about 2 million queries of top-10 lists


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
