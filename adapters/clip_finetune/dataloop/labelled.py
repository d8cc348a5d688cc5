"""Finished labelling tasks (labelling.py) into training pairs: each completed prompt item's free-text answer is
its caption ("yes" is rewritten to the query it answered), and the item is tagged `train`, so the next training
run reads it as any prompt item with a free-text annotation (docs/prompt-items.md). The data report counts the
pairs read from these items (`from_labelling`, by their metadata.user.clip_finetune.labelling).
"""

from __future__ import annotations

import logging
from typing import Any

import dtlpy as dl

from adapters.clip_finetune.errors import DataError

from .labelling import YES, normalise
from .search_log import METADATA_KEY

logger = logging.getLogger(__name__)

DONE = ("completed", "approved")  # the item statuses of a finished item (dl.ItemStatus)


def labelling_tasks(dataset: dl.Dataset) -> list[dl.Task]:
    """The dataset's tasks made by queries_to_labelling (their metadata.user.clip_finetune.labelling)."""
    tasks = dataset.tasks.list()
    return [t for t in tasks or [] if ((t.metadata or {}).get("user") or {}).get(METADATA_KEY, {}).get("labelling")]


def status_in(item: dl.Item, ref_ids: set[str]) -> str | None:
    """The item's status in the task (its refs to the task or to one of the task's assignments)."""
    for ref in ((item.metadata or {}).get("system") or {}).get("refs") or []:
        status = (ref.get("metadata") or {}).get("status")
        if ref.get("id") in ref_ids and status:
            return status
    return None


def _answer(item: dl.Item) -> dl.Annotation | None:
    """The first free-text answer of the item's first prompt (promptId "1", or none)."""
    for annotation in item.annotations.list():
        prompt_id = str(((annotation.metadata or {}).get("system") or {}).get("promptId", "1"))
        if annotation.type == "text" and prompt_id == "1" and str(annotation.coordinates or "").strip():
            return annotation
    return None


def harvest_item(item: dl.Item, query: str) -> str:
    """The caption a finished item gives: its answer, with "yes" rewritten to the query on the platform;
    raises DataError with the reason when it gives none."""
    answer = _answer(item)
    if answer is None:
        raise DataError("completed without an answer")
    text = str(answer.coordinates).strip()
    if normalise(text) in YES:
        answer.annotation_definition.text = query
        answer.update()
        return query
    if normalise(text) in ("no", "n", "no."):
        raise DataError('answered "no" without saying what the image shows')
    return text


def harvest(dataset: dl.Dataset, task: dl.Task) -> dict[str, Any]:
    """Tag the task's finished, answered items `train`; a summary: pairs (new ones), captions that were "yes",
    and the items skipped, by reason. Items already tagged train are left as they are (a second harvest of the
    same task adds nothing)."""
    ref_ids = {task.id, *(task.assignmentIds or [])}
    pairs, yes, skipped, ids = 0, 0, {}, []
    for page in dataset.tasks.get_items(task=task, dataset=dataset):
        for item in page:
            system = (item.metadata or {}).get("system") or {}
            query = ((item.metadata or {}).get("user") or {}).get(METADATA_KEY, {}).get("labelling", {}).get("query")
            status = status_in(item, ref_ids)
            reason = None
            if (system.get("tags") or {}).get("train"):
                reason = "already harvested"
            elif status not in DONE:
                reason = "discarded" if status in ("discard", "discarded") else "not finished"
            elif not isinstance(query, str):
                reason = "not a labelling item"
            if reason is None:
                try:
                    caption = harvest_item(item, query)
                except DataError as e:
                    reason = str(e)
                else:
                    pairs, yes, ids = pairs + 1, yes + (caption == query), [*ids, item.id]
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
    if ids:
        filters = dl.Filters(use_defaults=False, field="id", values=ids, operator=dl.FiltersOperations.IN)
        dataset.items.update(filters=filters, system_update_values={"tags": {"train": True}}, system_metadata=True)
    logger.info("labelling task %r: %d new pairs (%d answered yes), skipped %s", task.name, pairs, yes, skipped)
    return {"task_id": task.id, "task_name": task.name, "pairs": pairs, "answered_yes": yes, "skipped": skipped}


def harvest_all(dataset: dl.Dataset, task_id: str | None = None) -> dict[str, Any]:
    """Harvest one task (`task_id`) or every labelling task of the dataset; the summaries and the total."""
    tasks = [dataset.tasks.get(task_id=task_id)] if task_id else labelling_tasks(dataset)
    done = [harvest(dataset, task) for task in tasks]
    return {"tasks": done, "pairs": sum(d["pairs"] for d in done)}
