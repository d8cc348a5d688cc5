"""A dataset (the items a DQL filter selects) embedded into a model's feature set, and the sets it supersedes.

A large dataset is split into subsets of at most `predict_embed_subset_limit` items (dtlpy's key and default,
1000) by dtlpy's own splitter. With a service (a pipeline node's `context.service`), the first subset is
embedded here and the others are sent as executions of this app's `embed_subset` function on that service,
through the platform's execution API: its autoscaler spreads them over the service's replicas. Without one (the
SDK, the adapter's own embed_dataset) every subset is embedded in this process. dtlpy's embed_dataset instead
sends the subsets to the model's deployed service, which a model trained by a pipeline does not have.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Protocol

import dtlpy as dl

from adapters.clip_finetune.errors import ConfigError

from .embed_job import VectorsNotStoredError
from .platform import PLATFORM_ERRORS, as_filters, feature_sets_of, platform_failure

logger = logging.getLogger(__name__)

SUBSET_FUNCTION = "embed_subset"  # the app function (dataloop.json, module clip_nodes) that embeds one subset
DEFAULT_SUBSET_LIMIT = 1000  # dtlpy's PREDICT_EMBED_DEFAULT_SUBSET_LIMIT
PAGE_SIZE = 1000
SUPERSEDED = "superseded by"


class Embedder(Protocol):
    """What a dataset embedding needs of the adapter (ClipAdapter; not imported: the adapter imports this)."""

    model_entity: dl.Model

    def embed_items(self, items: list, upload_features: bool | None = None, batch_size: int | None = None,
                    progress: Any = None, only_stored: bool = False, **kwargs: Any
                    ) -> tuple[list[dl.Item], list[list[float]]]: ...


def subset_limit(model: dl.Model) -> int:
    """Items per subset: the model configuration's predict_embed_subset_limit (read from the raw dict: dtlpy's
    configuration.get would write the default into the model), else dtlpy's default."""
    value = (model.configuration or {}).get("predict_embed_subset_limit", DEFAULT_SUBSET_LIMIT)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"model {model.name!r}: predict_embed_subset_limit must be a positive integer (got "
                          f"{value!r})")
    return value


def split(dataset: dl.Dataset, filters: dl.Filters | dict | None, limit: int) -> list[dict[str, Any]]:
    """DQL queries of at most `limit` items each, together selecting what `filters` selects: dtlpy's own id-range
    splitter, the one its embed_dataset uses (a private helper; no public one exists)."""
    return list(dl.Filters._get_split_filters(dataset, as_filters(filters), limit))


def embed_subset(adapter: Embedder, dataset: dl.Dataset, query: dict[str, Any], progress: Any = None) -> int:
    """Embed the files one subset query selects into the model's feature set; the count embedded or stored."""
    query = {**copy.deepcopy(query), "page": 0, "pageSize": PAGE_SIZE}
    items = [i for page in dataset.items.list(filters=dl.Filters(custom_filter=query)) for i in page
             if i.type == "file"]
    done, _ = adapter.embed_items(items, progress=progress, only_stored=True)
    return len(done)


def embed_dataset(adapter: Embedder, dataset: dl.Dataset, filters: dl.Filters | dict | None = None,
                  service: dl.Service | None = None, progress: Any = None) -> int:
    """Fill the adapter's model's feature set with the vectors of the dataset's files `filters` selects; the
    count of items that have a vector. Raises VectorsNotStoredError when a subset failed (re-running embeds
    only what is missing)."""
    model = adapter.model_entity
    subsets = split(dataset, filters, subset_limit(model))
    if not subsets:
        logger.info("dataset %r: the filters select no item; nothing to embed", dataset.name)
        return 0
    executions = [_send(service, model, dataset, query) for query in subsets[1:]] if service is not None else []
    local = subsets[:1] if service is not None else subsets
    logger.info("embedding dataset %r with model %r: %d subsets here, %d as executions of %r", dataset.name,
                model.name, len(local), len(executions), SUBSET_FUNCTION)
    count = sum(embed_subset(adapter, dataset, query, progress) for query in local)
    return count + _wait(executions, model, dataset)


def _send(service: dl.Service, model: dl.Model, dataset: dl.Dataset, query: dict[str, Any]) -> dl.Execution:
    execution_input = {"model": {"model_id": model.id}, "dataset": {"dataset_id": dataset.id}, "filters": query}
    return service.execute(function_name=SUBSET_FUNCTION, execution_input=execution_input,
                           project_id=model.project_id)


def _wait(executions: list[dl.Execution], model: dl.Model, dataset: dl.Dataset) -> int:
    """Wait for every subset execution; their embedded counts summed, or VectorsNotStoredError naming the
    failed ones."""
    count, failed = 0, []
    for execution in executions:
        try:
            done = execution.wait()
        except PLATFORM_ERRORS as e:
            failed.append(f"{execution.id} ({platform_failure(e, f'/executions/{execution.id}')})")
            continue
        status = (done.latest_status or {}).get("status")
        if status != "success":
            failed.append(f"{done.id} ({status}: {str((done.latest_status or {}).get('message'))[:200]})")
        elif isinstance(done.output, int):
            count += done.output
    if failed:
        raise VectorsNotStoredError(
            f"model {model.name!r}, dataset {dataset.name!r}: {len(failed)} of {len(executions)} subset executions "
            f"failed: {', '.join(failed)}; re-run the embedding: items already embedded are skipped")
    return count


def mark_superseded(model: dl.Model, previous: dl.Model) -> list[str]:
    """Rename the feature sets of `previous` (the model `model` replaced) so that no one searches them by
    mistake: "<name> (superseded by <model name>)". Their vectors stay: the old model can still search them.
    Returns the new names."""
    renamed = []
    for feature_set in feature_sets_of(previous):
        if SUPERSEDED in feature_set.name:
            continue
        feature_set.name = f"{feature_set.name} ({SUPERSEDED} {model.name})"
        feature_set.update()
        renamed.append(feature_set.name)
        logger.info("feature set of model %r renamed %r", previous.name, feature_set.name)
    return renamed
