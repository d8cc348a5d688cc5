"""The search log: every search through the app (the dataset browser's panel, the search_items function) as one
entry with what it showed, so that the searches that failed can go back to labelling (labelling.py).

Where: one small hidden JSON item per search, in the searched dataset, under LOG_DIR. The entry is the file's
content and also its `metadata.user.clip_finetune.search_log`, so reading the log is one paged items query, never
one download per entry. Why one item per search and not one growing file: two searches that race would each read
the file, append and write it back, and one entry would be lost; creating two items cannot lose either. The only
read-modify-write left is feedback on one entry (`record_feedback`): the last writer wins, which loses nothing
but the earlier of two verdicts on the same search. Why not dataset metadata: it is one document (the same race)
and the whole of it travels with every dataset fetch. The log is bounded: past `max_entries` the oldest entries
are deleted.

What the panel cannot tell: the dataset browser shows the items of the query the panel returns; no click or
selection reaches the panel's script (docs/labelling-loop.md). Accepts and "wrong" verdicts come from
`record_feedback` (the search_feedback function, from the SDK or a pipeline).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dtlpy as dl

from adapters.clip_finetune.errors import DataError

from .embed_job import stored_vectors
from .platform import PLATFORM_ERRORS
from .search import ranked_items, search_query

logger = logging.getLogger(__name__)

LOG_DIR = "/.clip-finetune/search-log"
METADATA_KEY = "clip_finetune"  # item.metadata["user"][METADATA_KEY]["search_log"] holds the entry
MAX_ENTRIES = 5000  # entries kept per dataset; the oldest go first
LOGGED_RESULTS = 20  # results kept per entry (the first screen of the browser, and more)


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def new_entry(dataset_id: str, text: str, query: dict[str, Any], results: list[dict[str, Any]] | None,
              source: str) -> dict[str, Any]:
    """A log entry: the query text, the model that answered (query_vector's record) and its ranked results
    ([{id, score}], best first)."""
    return {"id": uuid.uuid4().hex, "time": now(), "text": text.strip(), "dataset_id": dataset_id,
            "model_id": query.get("model_id"), "model_name": query.get("model_name"),
            "feature_set_id": query.get("feature_set_id"), "source": source, "results": results}


def scored_results(items: list[dl.Item], query: dict[str, Any]) -> list[dict[str, Any]]:
    """[{id, score}] of ranked items: the cosine of each item's stored vector with the query vector (the
    platform ranks by Euclidean distance between unit vectors and returns no distance)."""
    if not items:
        return []
    feature_set = dl.feature_sets.get(feature_set_id=query["feature_set_id"])
    vectors = stored_vectors(feature_set, [i.id for i in items])
    return [{"id": i.id, "score": _cosine(query["vector"], vectors[i.id]) if i.id in vectors else None}
            for i in items]


def log_search(dataset: dl.Dataset, text: str, query: dict[str, Any], source: str,
               items: list[dl.Item] | None = None) -> dict[str, Any]:
    """Log a search whose query vector is `query` (query_vector's record): its ranked items (`items`, or the
    first LOGGED_RESULTS the platform ranks) scored, as a new entry. Never raises for the platform: the entry
    is returned with "logged": False when it could not be written."""
    try:
        if items is None:
            items = ranked_items(dataset, search_query(query["vector"], query["feature_set_id"], dataset.id,
                                                       LOGGED_RESULTS))
        results = scored_results(items[:LOGGED_RESULTS], query)
    except PLATFORM_ERRORS as e:
        logger.warning("search log: results of %r not read (%s); logged without them", text, e)
        results = None  # unknown, not "nothing found"
    entry = new_entry(dataset.id, text, query, results, source)
    entry["logged"] = record_quietly(dataset, entry) is not None
    return entry


def _cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return round(sum(x * y for x, y in zip(a, b, strict=False)) / norm, 6) if norm else 0.0


def record(dataset: dl.Dataset, entry: dict[str, Any], max_entries: int = MAX_ENTRIES) -> dl.Item:
    """Store `entry` as its own hidden item of `dataset`, then drop the oldest entries past `max_entries`."""
    name = f"{entry['time'][:26].replace(':', '-')}-{entry['id']}.json"  # sorts by time, to the microsecond
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(entry, indent=1))
        item = dataset.items.upload(local_path=str(path), remote_path=LOG_DIR,
                                    item_metadata={"user": {METADATA_KEY: {"search_log": entry}}})
    if not isinstance(item, dl.Item):
        raise DataError(f"search log: the entry of {entry['text']!r} could not be uploaded to {dataset.name!r}")
    item.hidden = True  # out of the browser, the search panel's filter and every subset filter (hidden: false)
    item = item.update()
    prune(dataset, max_entries)
    return item


def record_quietly(dataset: dl.Dataset, entry: dict[str, Any]) -> str | None:
    """`record`, with a failure logged instead of raised (a search never fails because its log could not be
    written); the entry's id, or None."""
    try:
        record(dataset, entry)
        return entry["id"]
    except (*PLATFORM_ERRORS, DataError) as e:
        logger.warning("search log: entry of %r not written to dataset %r (%s)", entry["text"], dataset.name, e)
        return None


def _log_filters() -> dl.Filters:
    # use_defaults=False: the default filter keeps hidden: false, and log items are hidden
    filters = dl.Filters(use_defaults=False, field="dir", values=LOG_DIR)
    filters.sort_by(field="filename", value=dl.FiltersOrderByDirection.ASCENDING)  # names start with the time
    return filters


def prune(dataset: dl.Dataset, max_entries: int = MAX_ENTRIES) -> int:
    """Delete the oldest entries past `max_entries` (at most 1000 a call); how many were deleted."""
    filters = _log_filters()
    filters.page_size = 1
    total = dataset.items.list(filters=filters).items_count
    excess = min(total - max_entries, 1000)
    if excess <= 0:
        return 0
    filters.page_size = excess
    oldest = [item.id for item in dataset.items.list(filters=filters).items]
    dataset.items.delete(filters=dl.Filters(use_defaults=False, field="id", values=oldest,
                                            operator=dl.FiltersOperations.IN))
    logger.info("search log of %r: %d oldest entries deleted (%d kept)", dataset.name, len(oldest), max_entries)
    return len(oldest)


def read(dataset: dl.Dataset) -> list[dict[str, Any]]:
    """Every entry of the dataset's search log, oldest first (feedback merged in)."""
    entries = []
    for page in dataset.items.list(filters=_log_filters()):
        for item in page:
            entry = ((item.metadata or {}).get("user") or {}).get(METADATA_KEY, {}).get("search_log")
            if isinstance(entry, dict) and isinstance(entry.get("text"), str):
                entries.append(entry)
    return entries


def record_feedback(dataset: dl.Dataset, search_id: str, accepted: list[str] | None = None,
                    wrong: bool | None = None) -> dict[str, Any]:
    """Mark a logged search: `accepted` are the result ids the user took; `wrong` says the results were wrong.
    Returns the updated entry."""
    filters = dl.Filters(use_defaults=False, field="dir", values=LOG_DIR)
    filters.add(field=f"metadata.user.{METADATA_KEY}.search_log.id", values=search_id)
    found = list(dataset.items.list(filters=filters).items)
    if not found:
        raise DataError(f"search log of {dataset.name!r} has no search {search_id!r}: pass the search_id a search "
                        "returned (search_items' output, or the log's entries)")
    item = found[0]
    entry = item.metadata["user"][METADATA_KEY]["search_log"]
    feedback = entry.setdefault("feedback", {})
    if accepted is not None:
        feedback["accepted"] = [str(i) for i in accepted]
    if wrong is not None:
        feedback["wrong"] = bool(wrong)
    feedback["time"] = now()
    item.update()
    return entry
