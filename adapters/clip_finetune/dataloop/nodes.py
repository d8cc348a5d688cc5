"""ClipNodes: the app's pipeline nodes ("Promote if better", "Embed dataset", and the labelling loop's "Failed searches
to labelling" and "Labelling to training pairs": docs/labelling-loop.md) and the functions that take a model
as an input, served by a module WITHOUT initInputs (dataloop.json, module clip_nodes), as Dataloop's
active-learning app serves "Create New Model" and "Compare Models": the model arrives with each execution.

dtlpy's runner loads this file by path (dataloop.json `entryPoint`): imports are absolute.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import dtlpy as dl

from adapters.clip_finetune.dataloop import (
    dataset_embedding,
    labelled,
    labelling,
    promotion,
    search,
    search_log,
    search_target,
)
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.errors import DataError

logger = logging.getLogger(__name__)

MODELS_IN_MEMORY = 2  # the gate holds two: the new model and the one it may replace


class ClipNodes(dl.BaseServiceRunner):
    """Pipeline nodes and model-input functions of the clip-finetune app; one instance per service replica."""

    def __init__(self) -> None:
        self._adapters: OrderedDict[str, ClipAdapter] = OrderedDict()
        self._lock = threading.Lock()  # a replica runs several executions at once (the service's concurrency)

    def adapter_for(self, model: dl.Model) -> ClipAdapter:
        """A loaded adapter of `model`, kept while its weights are current (least recently used dropped)."""
        with self._lock:
            adapter = self._adapters.pop(model.id, None)
            if adapter is None or not adapter.holds_weights_of(model):
                adapter = ClipAdapter(model_entity=model)
            self._adapters[model.id] = adapter
            while len(self._adapters) > MODELS_IN_MEMORY:
                self._adapters.popitem(last=False)
            return adapter

    def promote_if_better(
        self, new_model: dl.Model, previous_model: dl.Model | None, dataset: dl.Dataset, filters: dict | None = None,
        compare_config: dict | None = None, progress: Any = None, context: Any = None,
    ) -> dl.Model:
        """The winner of new_model against previous_model on the dataset's items `filters` selects (the template's
        test subset), by compare_config's metric and margin, refused when it loses more than the tolerance on the
        retention items (compare_config's retention_filters, else the new model's 'retention' subset); the action
        "promoted" or "kept" routes it. Both models' metrics land on the new model."""
        metric, margin = promotion.compare_settings(compare_config)
        retention = promotion.retention_settings(compare_config, new_model,
                                                 self.adapter_for(new_model).cfg.retention_tolerance)
        verdict = promotion.gate(self.adapter_for, new_model, previous_model, dataset, filters, metric, margin,
                                 retention)
        if progress is not None:
            progress.update(action=promotion.PROMOTED if verdict.promoted else promotion.KEPT,
                            message=verdict.summary())
        return new_model if verdict.promoted else previous_model

    def embed_dataset(self, model: dl.Model, dataset: dl.Dataset, filters: dict | None = None,
                      winner: dl.Model | None = None, progress: Any = None, context: Any = None) -> dl.Model:
        """Fill the model's feature set with the dataset's files; large datasets fan out as executions of
        embed_subset on this node's service. The feature sets of the model it superseded are renamed, and the
        dataset records the model as the one it is searched with (the search panel and the item trigger read it).

        In the template `model` is the Newest CLIP model variable and `winner` (the gate's output) only starts
        the node: after "kept" the variable is the model that already embedded the dataset, so nothing new is
        embedded. A winner the variable does not name yet (the platform ran this node before Update Variable)
        is embedded instead, so the promoted model's vectors are never missing."""
        if winner is not None and winner.id != model.id and promotion.superseded_by(winner) == model.id:
            logger.warning("the Newest CLIP model variable still names %r, not the promoted %r: embedding with %r",
                           model.name, winner.name, winner.name)
            model = winner
        service = _service_of(context)
        count = dataset_embedding.embed_dataset(self.adapter_for(model), dataset, filters, service, progress)
        previous_id = promotion.superseded_by(model)
        if previous_id is not None:
            dataset_embedding.mark_superseded(model, dl.models.get(model_id=previous_id))
        search_target.record_search_model(dataset, model)
        logger.info("model %r: %d items of dataset %r have a vector", model.name, count, dataset.name)
        return model

    def embed_subset(self, model: dl.Model, dataset: dl.Dataset, filters: dict, progress: Any = None) -> int:
        """One subset of an Embed dataset run (sent by embed_dataset as an execution); the count embedded."""
        return dataset_embedding.embed_subset(self.adapter_for(model), dataset, filters, progress)

    def search_items(self, model: dl.Model, dataset: dl.Dataset, text: str, k: int = 20, progress: Any = None
                     ) -> dict[str, Any]:
        """The dataset's items ranked for `text` by `model`, and the DQL query that ranks them (paste it in the
        dataset browser's query editor to browse them)."""
        adapter = self.adapter_for(model)
        search.checked_k(k)
        vector = search_target.query_vector(adapter, text)
        query = search.search_query(vector["vector"], vector["feature_set_id"], dataset.id, k)
        items = search.ranked_items(dataset, query)
        entry = search_log.log_search(dataset, text, vector, "search_items", items)
        return {"query": query, "items": [{"id": i.id, "name": i.name, "filename": i.filename} for i in items],
                "search_id": entry["id"] if entry["logged"] else None}

    def embed_item(self, item: dl.Item, progress: Any = None) -> dl.Item:
        """The item-created trigger's function: embed a new item with its dataset's search model (the newest
        promoted model that embedded the dataset); an item that model already embedded is skipped."""
        outcome = search_target.embed_new_item(self.adapter_for, item)
        if progress is not None:
            progress.update(message=f"item {item.filename}: {outcome}")
        return item

    def embed_query(self, dataset: dl.Dataset, text: str, model_id: str | None = None, progress: Any = None
                    ) -> dict[str, Any]:
        """What the dataset browser's search panel asks for: `text` embedded by the dataset's search model (or
        the model `model_id` names), as {vector, feature_set_id, model_id, model_name}."""
        model = search_target.search_model(dataset, (model_id or "").strip() or None)
        query = search_target.query_vector(self.adapter_for(model), text)
        entry = search_log.log_search(dataset, text, query, "panel")
        return {**query, "search_id": entry["id"] if entry["logged"] else None}

    def search_feedback(self, dataset: dl.Dataset, search_id: str, accepted: list | None = None,
                        wrong: bool | None = None, progress: Any = None) -> dict[str, Any]:
        """Mark a logged search: the result ids the user accepted, or that its results were wrong."""
        return search_log.record_feedback(dataset, search_id, accepted, wrong)

    def queries_to_labelling(self, dataset: dl.Dataset, assignees: list, queries: list | None = None,
                             config: dict | None = None, progress: Any = None, context: Any = None
                             ) -> dict[str, Any]:
        """The failed searches of the dataset's search log (or of `queries`: texts, searched now with the dataset's
        search model, or log entries) as a labelling task for `assignees`; config: labelling.SETTINGS."""
        cfg = labelling.settings(config)
        entries = search_log.read(dataset) if not queries else [self._searched(dataset, q) for q in queries]
        failed = labelling.failed_queries(entries, cfg["min_top_score"], cfg["require_accept"])
        target = dl.datasets.get(dataset_id=cfg["target_dataset_id"]) if cfg["target_dataset_id"] else dataset
        summary = labelling.queries_to_labelling(target, failed, list(assignees or []), cfg["task_name"],
                                                 cfg["candidates_per_query"], cfg["max_items"])
        if progress is not None:
            progress.update(message=f"{len(failed)} failed queries, {summary['items']} items to label")
        return summary

    def labelling_to_pairs(self, dataset: dl.Dataset, task_id: str | None = None, progress: Any = None
                           ) -> dict[str, Any]:
        """The finished items of one labelling task (task_id) or of all the dataset's, tagged train as pairs."""
        summary = labelled.harvest_all(dataset, (task_id or "").strip() or None)
        if progress is not None:
            progress.update(message=f"{summary['pairs']} new training pairs from labelling")
        return summary

    def _searched(self, dataset: dl.Dataset, query: Any) -> dict[str, Any]:
        """A log entry for a query given to queries_to_labelling: an entry (a dict with text) as it is, a text
        searched now with the dataset's search model (and logged, like any search)."""
        if isinstance(query, dict) and isinstance(query.get("text"), str):
            return query
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"labelling: a query must be a text or a log entry (got {query!r})")
        vector = search_target.query_vector(self.adapter_for(search_target.search_model(dataset)), query)
        return search_log.log_search(dataset, query, vector, "labelling")


def _service_of(context: Any) -> dl.Service | None:
    """The service this execution runs on (to send subsets to), when the platform gives one."""
    try:
        return context.service if context is not None else None
    except (AssertionError, AttributeError):  # dl.Context asserts when it holds no service
        return None
