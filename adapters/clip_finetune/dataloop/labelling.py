"""Failed searches back to labelling: pick the searches that failed, and make a Dataloop labelling task whose
items ask an annotator to judge each image the search showed.

The design (docs/labelling-loop.md says why): one prompt item per (failed query, shown image), prompt "1" holding
the image and the query. The annotator answers in free text: "yes" when the image is what the query asks for,
otherwise one sentence saying what the image shows; "discard" for an unusable item. Every answer is a training
pair: the query with the right images, a true caption with the wrong ones. The answers are free-text annotations
on prompt items, the form the adapter already trains on, so labelled.py only resolves "yes" into the query and
tags the finished items train.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import dtlpy as dl

from adapters.clip_finetune.errors import DataError

from .search_log import METADATA_KEY

logger = logging.getLogger(__name__)

LABELLING_DIR = "/clip-finetune-labelling"  # where the task's prompt items are made (visible: annotators open them)
MIN_TOP_SCORE = 0.25  # a top cosine below this is a failed search (CLIP ViT-B-32: matches score ~0.25-0.35)
CANDIDATES_PER_QUERY = 5  # images shown to the annotator per failed query (the top of what the search showed)
MAX_TASK_ITEMS = 500
YES = frozenset({"yes", "y", "yes.", "match", "matches", "correct", "right"})
INSTRUCTIONS = ('Someone searched for: "{query}". If this image shows what the search asks for, answer "yes". '
                "Otherwise write one sentence saying what the image shows. Discard the item if the image is unusable.")


@dataclass
class FailedQuery:
    """A query text whose searches failed, why, and the images its searches showed (best rank first)."""

    text: str
    reasons: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)
    top_score: float | None = None
    searches: int = 0


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def failure_reasons(entry: dict[str, Any], min_top_score: float, require_accept: bool) -> list[str]:
    """Why one logged search failed ([] when it did not): judged wrong by the user, nothing found, a top score
    below the threshold, or (with require_accept) nothing accepted."""
    feedback = entry.get("feedback") or {}
    if feedback.get("wrong"):
        return ["marked wrong"]
    if feedback.get("accepted"):
        return []
    results = entry.get("results")  # None: the search's results could not be read, which is no failure
    results = [r for r in results if isinstance(r, dict) and r.get("id")] if isinstance(results, list) else None
    scores = [r["score"] for r in results or [] if isinstance(r.get("score"), int | float)]
    reasons = []
    if results is not None and not results:
        reasons.append("nothing found")
    elif scores and max(scores) < min_top_score:
        reasons.append(f"top score {max(scores):.3f} < {min_top_score}")
    if require_accept:
        reasons.append("nothing accepted")
    return reasons


def failed_queries(entries: list[dict[str, Any]], min_top_score: float = MIN_TOP_SCORE,
                   require_accept: bool = False) -> list[FailedQuery]:
    """The failed queries of logged searches, one per query text (case and spacing ignored): a text fails when
    one of its searches failed and none was accepted; its candidates are the images its searches showed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if isinstance(entry.get("text"), str) and entry["text"].strip():
            groups.setdefault(normalise(entry["text"]), []).append(entry)
    failed = []
    for group in groups.values():
        reasons = [failure_reasons(e, min_top_score, require_accept) for e in group]
        accepted = any(not r and (e.get("feedback") or {}).get("accepted") for e, r in zip(group, reasons,
                                                                                          strict=True))
        if accepted or not any(reasons):
            continue
        results = [(rank, r) for e in group for rank, r in enumerate(e.get("results") or [])
                   if isinstance(r, dict) and r.get("id")]
        ranked = sorted(((rank, r["id"]) for rank, r in results), key=lambda x: x[0])
        scores = [r["score"] for _, r in results if isinstance(r.get("score"), int | float)]
        failed.append(FailedQuery(group[-1]["text"].strip(), sorted({x for r in reasons for x in r}),
                                  list(dict.fromkeys(i for _, i in ranked)), max(scores, default=None), len(group)))
    return failed


def prompt_name(query: str, image_id: str) -> str:
    digest = hashlib.sha1(normalise(query).encode()).hexdigest()[:12]
    return f"q{digest}-{image_id}.json"


def _existing_names(dataset: dl.Dataset) -> set[str]:
    filters = dl.Filters(field="dir", values=LABELLING_DIR)
    return {item.name for page in dataset.items.list(filters=filters) for item in page}


def make_prompt_items(target: dl.Dataset, failed: list[FailedQuery], per_query: int = CANDIDATES_PER_QUERY,
                      max_items: int = MAX_TASK_ITEMS) -> tuple[list[dl.Item], dict[str, int]]:
    """One prompt item per (failed query, candidate image) in `target` under LABELLING_DIR, skipping pairs an
    earlier run made already; the items made and what was skipped, by reason."""
    existing, made, skipped = _existing_names(target), [], {}
    for query in failed:
        if not query.candidates:
            skipped["query with no image to show"] = skipped.get("query with no image to show", 0) + 1
            continue
        prompts = []
        for image_id in query.candidates[:per_query]:
            name = prompt_name(query.text, image_id)
            if name in existing:
                skipped["already sent to labelling"] = skipped.get("already sent to labelling", 0) + 1
                continue
            if len(made) + len(prompts) >= max_items:
                skipped["past max_items"] = skipped.get("past max_items", 0) + 1
                continue
            prompt = dl.PromptItem(name=name)
            prompt.add(message={"role": "user", "content": [
                {"mimetype": dl.PromptType.IMAGE, "value": dl.items.get(item_id=image_id).stream},
                {"mimetype": dl.PromptType.TEXT, "value": INSTRUCTIONS.format(query=query.text)}]})
            prompts.append(prompt)
        if prompts:
            meta = {"user": {METADATA_KEY: {"labelling": {"query": query.text, "reasons": query.reasons}}}}
            uploaded = target.items.upload(local_path=prompts, remote_path=LABELLING_DIR, item_metadata=meta)
            made += [uploaded] if isinstance(uploaded, dl.Item) else list(uploaded or [])
    return made, skipped


def create_task(target: dl.Dataset, items: list[dl.Item], assignees: list[str], task_name: str | None = None,
                due_days: int = 7) -> dl.Task:
    """A labelling task of `items`, distributed over `assignees` (user emails) in equal shares."""
    if not assignees or not all(isinstance(a, str) and "@" in a for a in assignees):
        raise DataError(f"labelling: assignees must be a list of user emails (got {assignees!r})")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H%M%S")
    due = (datetime.datetime.now() + datetime.timedelta(days=due_days)).timestamp()
    return target.tasks.create(
        task_name=task_name or f"CLIP failed searches {stamp}", due_date=due, assignee_ids=list(assignees),
        items=items, metadata={"user": {METADATA_KEY: {"labelling": True}}})


def queries_to_labelling(target: dl.Dataset, failed: list[FailedQuery], assignees: list[str],
                         task_name: str | None = None, per_query: int = CANDIDATES_PER_QUERY,
                         max_items: int = MAX_TASK_ITEMS) -> dict[str, Any]:
    """Prompt items for the failed queries and a labelling task of them; a summary (task_id None when there was
    nothing new to label)."""
    if not assignees:
        raise DataError("labelling: name at least one assignee (a user email of the project)")
    items, skipped = make_prompt_items(target, failed, per_query, max_items)
    summary: dict[str, Any] = {"failed_queries": [q.text for q in failed], "items": len(items), "skipped": skipped,
                               "task_id": None, "task_name": None}
    if not items:
        logger.info("labelling: no new items for %d failed queries (%s)", len(failed), skipped)
        return summary
    task = create_task(target, items, assignees, task_name)
    summary.update(task_id=task.id, task_name=task.name, assignees=list(assignees))
    logger.info("labelling task %r: %d items for %d failed queries", task.name, len(items), len(failed))
    return summary


SETTINGS = {"min_top_score": MIN_TOP_SCORE, "require_accept": False, "candidates_per_query": CANDIDATES_PER_QUERY,
            "max_items": MAX_TASK_ITEMS, "task_name": None, "target_dataset_id": None}


def settings(config: dict[str, Any] | None) -> dict[str, Any]:
    """The labelling node's configuration with its defaults; an unknown key or a bad value is a DataError."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(SETTINGS))
    if unknown:
        raise DataError(f"labelling config: unknown keys {unknown}; known: {sorted(SETTINGS)}")
    out = {**SETTINGS, **config}
    if not isinstance(out["min_top_score"], int | float) or not -1 <= out["min_top_score"] <= 1:
        raise DataError(f"labelling config: min_top_score must be a cosine from -1 to 1 (got {out['min_top_score']!r})")
    for key in ("candidates_per_query", "max_items"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise DataError(f"labelling config: {key} must be an integer >= 1 (got {out[key]!r})")
    return out
