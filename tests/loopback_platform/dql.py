"""The DQL engine: whether an entity matches a query's filter, the query's sort, and the paged reply.

dtlpy sends the same DQL shape for items, annotations, models, feature sets, vectors and metrics, so every
query route of the stand-in answers through `dql_match`, `dql_sort` and `dql_page`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .common import JSON

_MISSING = object()


def tag_subset_filter(tag: str) -> JSON:
    """The subset filter shape of Dataloop's model templates: visible files tagged `tag`."""
    return {"filter": {"$and": [{"hidden": False}, {f"metadata.system.tags.{tag}": True}, {"type": "file"}]}}


def _resolve(doc: Any, dotted: str) -> Any:
    """Value at a dotted path; a list on the way maps over its elements (Mongo semantics)."""
    cur: Any = doc
    for part in dotted.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list):
            found = [_resolve(x, part) for x in cur]
            found = [x for x in found if x is not _MISSING]
            if not found:
                return _MISSING
            cur = found
        else:
            return _MISSING
    return cur


def _glob_regex(pattern: str) -> re.Pattern[str]:
    # The platform's wildcard in dir/filename values spans folders: dtlpy's folder filter sends
    # {"dir": "/f"} OR {"dir": "/f/*"} to mean "folder f and everything below it". Mimetypes too:
    # clip-smart-search's trigger filter selects {"metadata.system.mimetype": "image/*"}.
    out = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(f"^{out}$")


def _cmp(actual: Any, expected: Any, op: str) -> bool:
    if actual is _MISSING or actual is None:
        return False
    try:
        return {
            "$gt": actual > expected,
            "$gte": actual >= expected,
            "$lt": actual < expected,
            "$lte": actual <= expected,
        }[op]
    except TypeError:
        return False


def _equals(actual: Any, expected: Any) -> bool:
    if actual is _MISSING:
        return expected is None
    if isinstance(actual, list) and not isinstance(expected, list):
        return any(_equals(a, expected) for a in actual)
    return actual == expected


def _field_matches(actual: Any, cond: Any, key: str) -> bool:
    if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
        return all(_operator(actual, op, val, key) for op, val in cond.items())
    if isinstance(cond, str) and "*" in cond and key.split(".")[-1] in ("dir", "filename", "mimetype"):
        return _operator(actual, "$glob", cond, key)
    return _equals(actual, cond)


def _operator(actual: Any, op: str, val: Any, key: str) -> bool:
    if op == "$eq":
        return _equals(actual, val)
    if op == "$ne":
        return not _equals(actual, val)
    if op == "$in":
        return any(_equals(actual, v) for v in val)
    if op == "$nin":
        return not any(_equals(actual, v) for v in val)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _cmp(actual, val, op)
    if op == "$exists":
        return (actual is not _MISSING) == bool(val)
    if op in ("$glob", "$regex"):
        rx = _glob_regex(val) if op == "$glob" else re.compile(val)
        values = actual if isinstance(actual, list) else [actual]
        return any(isinstance(v, str) and rx.search(v) for v in values)
    raise DqlError(f"unsupported DQL operator {op!r} on {key!r}")


class DqlError(ValueError):
    """A query the stand-in cannot evaluate: answered 400 and recorded in `unhandled`."""


def dql_match(doc: JSON, flt: JSON | None) -> bool:
    """Whether `doc` satisfies a DQL filter ($and/$or/$in/$exists/$eq/$ne/$gt(e)/$lt(e)/$glob, dotted keys)."""
    for key, cond in (flt or {}).items():
        if key == "$and":
            if not all(dql_match(doc, f) for f in cond):
                return False
        elif key == "$or":
            if cond and not any(dql_match(doc, f) for f in cond):
                return False
        elif key == "$nor":
            if any(dql_match(doc, f) for f in cond):
                return False
        elif key.startswith("$"):
            raise DqlError(f"unsupported DQL clause {key!r}")
        elif not _field_matches(_resolve(doc, key), cond, key):
            return False
    return True


def dql_sort(docs: list[JSON], sort: JSON | None) -> list[JSON]:
    """Sort by the query's "sort" ({"id": "ascending"}), default by id ascending as the platform does."""
    keys = list((sort or {"id": "ascending"}).items())
    for key, direction in reversed(keys):
        desc = str(direction).lower() in ("descending", "desc", "-1")

        def sort_key(d: JSON, key: str = key) -> tuple[int, float, str]:
            v = _resolve(d, key)
            if v is _MISSING or v is None:
                return (0, 0.0, "")
            if isinstance(v, int | float):
                return (1, float(v), "")
            return (2, 0.0, v if isinstance(v, str) else json.dumps(v, sort_keys=True))

        docs = sorted(docs, key=sort_key, reverse=desc)
    return docs


def dql_page(docs: list[JSON], query: JSON) -> JSON:
    """The paged reply: `pageSize: 0` only counts (dtlpy uses it for items_count)."""
    page = int(query.get("page", 0) or 0)
    size = int(query.get("pageSize", 1000) if query.get("pageSize") is not None else 1000)
    total = len(docs)
    if size <= 0:
        return {"items": [], "totalItemsCount": total, "totalPagesCount": 0, "hasNextPage": False}
    start = page * size
    return {
        "items": docs[start : start + size],
        "totalItemsCount": total,
        "totalPagesCount": math.ceil(total / size),
        "hasNextPage": start + size < total,
    }
