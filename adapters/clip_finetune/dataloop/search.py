"""Text search over a dataset with a (fine-tuned) model, on the platform: the query text is embedded by the same
model whose image vectors fill its feature set, and the platform ranks the items with its vector query.

Dataloop's CLIP search panel (dataloop-ai-apps/clip-smart-search, entire.js) embeds the query in the browser with
a pretrained CLIP and queries one fixed feature set; a tuned model's image vectors only make sense against
query vectors of the same tuned model, so the query here is built the same way (a DQL join on
`feature_vectors` sorted by `$euclid`, Euclidean distance: on unit vectors it ranks like cosine) with the
vector and the feature set of the given model.

The one-call SDK helpers: `search(model, dataset, "a red dress")` and `embed_dataset(model, dataset)`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import dtlpy as dl

from adapters.clip_finetune.errors import DataError

from . import dataset_embedding
from .adapter import ClipAdapter
from .search_target import query_vector

logger = logging.getLogger(__name__)

FILES = {"$and": [{"hidden": False}, {"type": "file"}]}  # the panel's default item filter
MAX_RESULTS = 1000  # one page: the panel's page size


def search_query(vector: list[float], feature_set_id: str, dataset_id: str, k: int,
                 items_filter: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset query that returns the items with a vector in the feature set, nearest to `vector` first
    (clip-smart-search's query, with this model's vector and feature set)."""
    return {
        "filter": copy.deepcopy(items_filter or FILES),
        "page": 0,
        "pageSize": k,
        "resource": "items",
        "join": {
            "on": {"resource": "feature_vectors", "local": "entityId", "forigen": "id"},  # "forigen": sic, DQL
            "filter": {
                "value": {"$euclid": {"input": list(vector), "$euclidSort": {"eu_dist": "ascending"}}},
                "featureSetId": feature_set_id,
                "datasetId": dataset_id,
            },
        },
    }


def text_query(adapter: ClipAdapter, dataset: dl.Dataset, text: str, k: int = 20,
               items_filter: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ranked-items query of `text` against the adapter's model's feature set."""
    checked_k(k)
    query = query_vector(adapter, text)  # the text checked, the model's feature set found, the text embedded
    return search_query(query["vector"], query["feature_set_id"], dataset.id, k, items_filter)


def checked_k(k: int) -> int:
    if not isinstance(k, int) or not 1 <= k <= MAX_RESULTS:
        raise DataError(f"search: k must be an integer from 1 to {MAX_RESULTS} (got {k!r})")
    return k


def search(model: dl.Model, dataset: dl.Dataset, text: str, k: int = 20,
           items_filter: dict[str, Any] | None = None, adapter: ClipAdapter | None = None) -> list[dl.Item]:
    """The dataset's items ranked by `model` for `text`, best first (at most k). The dataset must have been
    embedded with this model (its feature set)."""
    adapter = adapter if adapter is not None else ClipAdapter(model_entity=model)
    return ranked_items(dataset, text_query(adapter, dataset, text, k, items_filter))


def ranked_items(dataset: dl.Dataset, query: dict[str, Any]) -> list[dl.Item]:
    """The first page of a search query's items, in the platform's order (nearest first)."""
    return list(dataset.items.list(filters=dl.Filters(custom_filter=query)).items)[: query["pageSize"]]


def embed_dataset(model: dl.Model, dataset: dl.Dataset, filters: dl.Filters | dict | None = None,
                  adapter: ClipAdapter | None = None) -> int:
    """Embed the dataset's files (those `filters` selects) with `model` into its feature set, in this process;
    items that already have a vector are skipped. Returns the count of items with a vector."""
    adapter = adapter if adapter is not None else ClipAdapter(model_entity=model)
    return dataset_embedding.embed_dataset(adapter, dataset, filters)
