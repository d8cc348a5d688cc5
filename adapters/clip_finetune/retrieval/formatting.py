"""Plain-text tables of retrieval metrics: before / after / change, and a WiSE-FT sweep (one column per alpha)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..config import DIRECTIONS
from .metrics import LOWER_IS_BETTER
from .zero_shot import ACCURACY_KS, ZERO_SHOT

# Rows format_table shows when not told otherwise, for each direction. hit@k is what CLIP papers call
# image->text "R@k" (any caption in the top k); our recall@k divides by the true number of captions.
DEFAULT_TABLE_METRICS = (
    "recall@1",
    "recall@5",
    "recall@10",
    "hit@1",
    "hit@5",
    "precision@5",
    "f1@5",
    "ndcg@10",
    "mrr",
    "map",
    "r_precision",
    "median_rank",
    "mean_rank",
)
# Zero-shot classification rows, shown when the data had class labels (per-class accuracy stays in the JSON)
ZERO_SHOT_TABLE_METRICS = tuple(f"top{k}_accuracy" for k in ACCURACY_KS)

def _is_rank(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def _cell(value: float | None, rank: bool, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:{'+' if signed else ''}.{1 if rank else 3}f}"


def format_table(
    before: Mapping[str, float] | None,
    after: Mapping[str, float] | None = None,
    metrics: Sequence[str] | None = None,
) -> str:
    """A plain-text table: one row per metric, grouped by direction; columns before / after / change.

    Only the given columns are shown ("change" = after - before, when both are given). Values have 3
    decimals, ranks 1. `metrics` entries are full keys ("text_to_image/mrr") or bare names ("mrr", shown
    for each direction); a requested metric found in neither dict is a ValueError. By default the rows
    are DEFAULT_TABLE_METRICS for each direction, keeping those present in a dict; bare keys (the output
    of ranking_metrics) are supported too.
    """
    columns = [(name, d) for name, d in (("before", before), ("after", after)) if d is not None]
    if not columns:
        raise ValueError("format_table needs `before`, `after` or both")
    return _table(columns, metrics, change=len(columns) == 2)


def format_scores(scores: Mapping[str, float], title: str, metrics: Sequence[str] | None = None) -> str:
    """format_table of one set of scores (one model evaluated), its column titled `title`."""
    return _table([(title, scores)], metrics, change=False)


def format_sweep(results: Mapping[float, Mapping[str, float]], metrics: Sequence[str] | None = None) -> str:
    """format_table with one column per WiSE-FT alpha (`results`: alpha -> metrics)."""
    return _table([(f"alpha={alpha:g}", d) for alpha, d in results.items()], metrics, change=False)


def _table(columns: list[tuple[str, Mapping[str, float]]], metrics: Sequence[str] | None, change: bool) -> str:
    present = set().union(*(d.keys() for _, d in columns))

    # rows: (group, label, key); a None group means bare keys, shown without a direction heading
    rows: list[tuple[str | None, str, str]] = []
    if metrics is None:
        for d in DIRECTIONS:
            rows += [(d, m, f"{d}/{m}") for m in DEFAULT_TABLE_METRICS if f"{d}/{m}" in present]
        rows += [(ZERO_SHOT, m, f"{ZERO_SHOT}/{m}") for m in ZERO_SHOT_TABLE_METRICS if f"{ZERO_SHOT}/{m}" in present]
        if not rows:
            rows = [(None, m, m) for m in DEFAULT_TABLE_METRICS if m in present]
        if not rows:
            raise ValueError("none of the default table metrics is in the given results")
    else:
        missing = []
        for m in metrics:
            if "/" in m:
                group, _, label = m.rpartition("/")
                found = [(group, label, m)] if m in present else []
            elif m in present:
                found = [(None, m, m)]
            else:
                found = [(d, m, f"{d}/{m}") for d in DIRECTIONS if f"{d}/{m}" in present]
            rows += found
            if not found:
                missing.append(m)
        if missing:
            raise ValueError(f"metrics not in the results: {', '.join(missing)}")
        # keep rows of one direction together, in the order first asked for
        group_order = list(dict.fromkeys(g for g, _, _ in rows))
        rows.sort(key=lambda row: group_order.index(row[0]))

    headers = [name for name, _ in columns] + (["change"] if change else [])
    body: list[tuple[str | None, str, list[str]]] = []
    for group, label, key in rows:
        rank = _is_rank(key)
        values = [d.get(key) for _, d in columns]
        cells = [_cell(v, rank) for v in values]
        if change:
            b, a = values
            cells.append(_cell(None if a is None or b is None else a - b, rank, signed=True))
        body.append((group, label, cells))

    indent = "  "
    label_w = max([len(indent + label) for _, label, _ in body] + [len(g or "") for g, _, _ in body] + [6])
    col_w = max([len(h) for h in headers] + [len(c) for *_, cells in body for c in cells])
    lines = [f"{'metric':<{label_w}}" + "".join(f"  {h:>{col_w}}" for h in headers)]
    lines.append("-" * len(lines[0]))
    current: str | None = None
    for group, label, cells in body:
        if group is not None and group != current:
            lines.append(group)
            current = group
        name = indent + label if group is not None else label
        lines.append(f"{name:<{label_w}}" + "".join(f"  {c:>{col_w}}" for c in cells))
    if any(_is_rank(key) for _, _, key in rows):
        lines.append(f"({', '.join(LOWER_IS_BETTER)}: lower is better; all others: higher is better)")
    return "\n".join(lines)
