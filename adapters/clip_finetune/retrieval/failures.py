"""The failure gallery: of the search queries (text -> image) that both the base model and the tuned one were
scored on, those that got worse (their first relevant image moved down the ranking, or out of the top k) and
those still failing (not in the top k before, nor after), each with its top images before and after.

It is computed from the two per-query evaluations a run keeps in its model folder (per_query_before.json: the
base model; per_query.json: the saved model, on the same split as metrics.json's 'after') and written beside
them as failures.json; `clip-finetune report` shows it. Both lists are bounded (SHOWN worst each); the counts
cover every query, and the two per-query files hold all of them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ..config import DIRECTIONS
from ..errors import DataError
from ..files import atomic_write
from .evaluation_result import PER_QUERY_NAME, DirectionResult, EvaluationResult

log = logging.getLogger(__name__)

FORMAT = "clip-finetune failure gallery v1"
FAILURES_NAME = "failures.json"
BEFORE_NAME = "per_query_before.json"  # the base model's evaluation on the split the 'after' figures come from
K = 5  # in the top 5 = found (recall@5, the figure a search page shows first)
SHOWN = 20  # entries kept per list, worst first
RELEVANT_SHOWN = 5  # relevant images named per entry (a class caption may have hundreds)


def failure_gallery(before: EvaluationResult, after: EvaluationResult, k: int = K, shown: int = SHOWN
                    ) -> dict[str, Any]:
    """The gallery of the text->image queries both evaluations ran (matched by query text).

    worse: the first relevant image's rank after > before; those that fell out of the top k first, then by how
    far they fell (after / before), then by rank after. still_failing: rank > k before and after, and not worse
    (a query that failed and fell further is in `worse`, once); highest rank after first."""
    b, a = before.directions[DIRECTIONS[0]], after.directions[DIRECTIONS[0]]
    k = min(k, b.top_ids.shape[1], a.top_ids.shape[1]) or k
    rank_b = dict(zip(b.queries, b.first_ranks().tolist(), strict=True))
    index_b = {q: i for i, q in enumerate(b.queries)}
    rows = [(j, q, rank_b[q], r) for j, (q, r) in enumerate(zip(a.queries, a.first_ranks().tolist(), strict=True))
            if q in rank_b]
    worse = sorted((x for x in rows if x[3] > x[2]),
                   key=lambda x: (not x[2] <= k < x[3], -math.log(x[3] / x[2]), -x[3], x[1]))
    still = sorted((x for x in rows if x[2] > k and x[3] > k and x[3] <= x[2]), key=lambda x: (-x[3], x[1]))
    images: dict[str, str] = {}

    def entry(j: int, query: str, r_before: int, r_after: int) -> dict[str, Any]:
        i = index_b[query]
        item = {"query": query, "rank_before": r_before, "rank_after": r_after,
                "relevant": [c for c, _ in a.query(j)["relevant"][:RELEVANT_SHOWN]],
                "top_before": _top(b, i, k), "top_after": _top(a, j, k)}
        for ident in (*item["relevant"], *(c for c, _ in item["top_before"]), *(c for c, _ in item["top_after"])):
            paths = (after.images.get(ident) or before.images.get(ident) or {}).get("paths") or []
            if paths:
                images.setdefault(ident, paths[0])
        return item

    counts = {"queries": len(rows), "worse": len(worse), "fell_out_of_top_k": sum(r[2] <= k < r[3] for r in rows),
              "still_failing": len(still), "failing_after": sum(r[3] > k for r in rows),
              "better": sum(r[3] < r[2] for r in rows), "fixed": sum(r[3] <= k < r[2] for r in rows)}
    return {"format": FORMAT, "direction": DIRECTIONS[0], "k": k, "shown": shown, "counts": counts,
            "worse": [entry(*x) for x in worse[:shown]], "still_failing": [entry(*x) for x in still[:shown]],
            "images": images}


def _top(d: DirectionResult, i: int, k: int) -> list[list[Any]]:
    return [[d.candidates[c], round(float(s), 6)] for c, s in zip(d.top_ids[i, :k].tolist(),
                                                                  d.top_scores[i, :k].tolist(), strict=True)]


def write_failures(out: Path) -> Path | None:
    """failures.json from the two per-query files in the model folder `out`; None (and nothing written) when
    either is missing or unreadable: a run without evaluation data, or one resumed from a checkpoint written
    before the base model's per-query file was kept. A stale gallery of an earlier run is removed first."""
    (out / FAILURES_NAME).unlink(missing_ok=True)
    if not (out / BEFORE_NAME).is_file() or not (out / PER_QUERY_NAME).is_file():
        return None
    try:
        gallery = failure_gallery(EvaluationResult.read(out / BEFORE_NAME), EvaluationResult.read(out / PER_QUERY_NAME))
    except DataError as e:
        log.warning("no failure gallery: %s", e)
        return None
    text = json.dumps(gallery, ensure_ascii=False, indent=1)
    atomic_write(out / FAILURES_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    c = gallery["counts"]
    log.info("failure gallery: of %d queries, %d got worse (%d fell out of the top %d), %d still fail; %s",
             c["queries"], c["worse"], c["fell_out_of_top_k"], gallery["k"], c["still_failing"], out / FAILURES_NAME)
    return out / FAILURES_NAME
