"""What every module of dataloop/ needs of the platform client: the errors a failed call raises and how to say
which, filters, and the few item facts read off an item's JSON."""

from __future__ import annotations

import re

import dtlpy as dl

# What a failed platform call raises. Not PlatformException alone: its constructor raises a subclass of
# ExceptionMain (NotFound, InternalServerError, ...) in its place. Connection errors and timeouts (requests)
# are OSErrors.
PLATFORM_ERRORS = (dl.exceptions.ExceptionMain, dl.exceptions.PlatformException, OSError)
VECTORS = "/features/vectors"  # the platform's feature vector route, for messages
ITEM_ID = re.compile(r"[0-9a-fA-F]{24}")


def platform_failure(e: BaseException, path: str) -> str:
    """The cause of a failed request to `path`, in a few words."""
    if isinstance(e, dl.exceptions.ExceptionMain):
        return f"HTTP {e.status_code} from {path}: {str(e.message)[:200]}"
    late = "; the platform may still store some late: a re-run deletes duplicate copies" if path == VECTORS else ""
    return f"no answer from {path} ({type(e).__name__}){late}"


def as_filters(filters: dl.Filters | dict | None) -> dl.Filters:
    """A dl.Filters from what a function input carries: Filters, a DQL dict, or nothing (all items)."""
    if isinstance(filters, dl.Filters):
        return filters
    return dl.Filters(custom_filter=filters) if filters else dl.Filters()


def item_size(item: dl.Item) -> int | None:
    return ((item.metadata or {}).get("system") or {}).get("size")


def is_prompt_item(item: dl.Item) -> bool:
    system = (item.metadata or {}).get("system") or {}
    return (system.get("shebang") or {}).get("dltype") == "prompt"


def feature_sets_of(model: dl.Model) -> list[dl.FeatureSet]:
    """The feature sets `model` made (the project's sets whose modelId is its id), every page."""
    filters = dl.Filters(field="modelId", values=model.id, resource=dl.FiltersResource.FEATURE_SET)
    return [fs for page in model.project.feature_sets.list(filters=filters) for fs in page]
