"""Which model serves a dataset's search, recorded on the dataset, and the two functions that read it: the
dataset browser's search panel (`query_vector`: the query text embedded by that model) and the item-created
trigger (`embed_new_item`: a new item embedded by that model).

Why on the dataset (metadata.user.clip_finetune.search): the panel runs in the dataset browser and the trigger
gets an item, so the dataset is the one entity both have at hand; a project can hold several datasets searched
with different models (one pipeline each); a pipeline variable is readable only by someone who knows the pipeline,
and a model's own metadata cannot say it is the newest. The Embed dataset node writes the record once the model's
feature set holds the dataset's vectors, so search switches to a promoted model only when its vectors are there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import dtlpy as dl

from adapters.clip_finetune.errors import DataError, ModelError

from .embed_job import stored_vectors
from .platform import is_prompt_item

if TYPE_CHECKING:
    from .adapter import ClipAdapter

logger = logging.getLogger(__name__)

METADATA_KEY = "clip_finetune"  # dataset.metadata["user"][METADATA_KEY]["search"]
EMBEDDED, ALREADY_EMBEDDED, NO_SEARCH_MODEL, NOT_A_FILE = "embedded", "already embedded", "no search model", "skipped"


def record_search_model(dataset: dl.Dataset, model: dl.Model) -> dict[str, Any]:
    """Make `model` (its feature set filled with the dataset's vectors) the one the dataset is searched with."""
    feature_set = model.feature_set
    if feature_set is None:
        raise ModelError(f"model {model.name!r} has no feature set: embed dataset {dataset.name!r} with it first")
    record = {"model_id": model.id, "model_name": model.name, "feature_set_id": feature_set.id,
              "updated_at": datetime.now(timezone.utc).isoformat()}
    metadata = dataset.metadata if isinstance(dataset.metadata, dict) else {}
    metadata.setdefault("user", {}).setdefault(METADATA_KEY, {})["search"] = record
    dataset.metadata = metadata
    dataset.update()
    logger.info("dataset %r is now searched with model %r (feature set %s)", dataset.name, model.name, feature_set.id)
    return record


def search_model_of(dataset: dl.Dataset) -> dict[str, Any] | None:
    """The dataset's search record ({model_id, model_name, feature_set_id}), or None when none was written."""
    user = ((dataset.metadata or {}).get("user") or {}) if isinstance(dataset.metadata, dict) else {}
    record = (user.get(METADATA_KEY) or {}).get("search")
    return record if isinstance(record, dict) and record.get("model_id") else None


def search_model(dataset: dl.Dataset, model_id: str | None = None) -> dl.Model:
    """The model to search `dataset` with: `model_id` when given (a model the user picked), else the dataset's
    recorded search model."""
    if not model_id:
        record = search_model_of(dataset)
        if record is None:
            raise DataError(f"dataset {dataset.name!r} has no search model yet: run the CLIP Fine-tune and Embed "
                            "pipeline on it (its Embed dataset node records the model), or pick a model id")
        model_id = record["model_id"]
    try:
        return dl.models.get(model_id=model_id)
    except dl.exceptions.NotFound as e:
        raise DataError(f"model {model_id!r} does not exist (or is not visible to this project): pick another "
                        "model id, or leave it empty for the dataset's search model; if the dataset records it, "
                        "run the pipeline's Embed dataset again to record a model that exists") from e


def query_vector(adapter: ClipAdapter, text: str) -> dict[str, Any]:
    """The unit vector of `text` by the adapter's model and the feature set it is compared with: what the search
    panel puts in its `$euclid` query."""
    if not isinstance(text, str) or not text.strip():
        raise DataError("search: the query text is empty; type what to look for")
    model = adapter.model_entity
    feature_set = model.feature_set
    if feature_set is None:
        raise ModelError(f"model {model.name!r} has no feature set: embed the dataset with it first (the "
                         "pipeline's Embed dataset node, or embed_dataset(model, dataset))")
    (vector,) = adapter.embed([text.strip()])
    return {"vector": [float(v) for v in vector], "feature_set_id": feature_set.id, "model_id": model.id,
            "model_name": model.name}


def embed_new_item(adapter_for: Callable[[dl.Model], ClipAdapter], item: dl.Item) -> str:
    """Embed a newly created item with its dataset's search model; what happened (EMBEDDED, ALREADY_EMBEDDED,
    NO_SEARCH_MODEL or NOT_A_FILE). Idempotent: an item the model's feature set already holds is not embedded
    again, so a re-fired trigger or an Embed dataset run at the same time cost nothing."""
    if item.type != "file" or is_prompt_item(item):
        return NOT_A_FILE  # folders; prompt items' vectors are not stored by a dataset embedding either
    record = search_model_of(item.dataset)
    if record is None:
        logger.info("item %r: dataset %r has no search model; not embedded", item.filename, item.dataset.name)
        return NO_SEARCH_MODEL
    model = search_model(item.dataset)
    feature_set = model.feature_set
    if feature_set is not None and stored_vectors(feature_set, [item.id]):
        return ALREADY_EMBEDDED
    done, _ = adapter_for(model).embed_items([item], only_stored=True)
    if not done:
        raise DataError(f"item {item.filename!r} could not be embedded by model {model.name!r} (see the log)")
    logger.info("item %r embedded by model %r", item.filename, model.name)
    return EMBEDDED
