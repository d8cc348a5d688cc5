"""What dtlpy's download of a model's subsets left out. An item whose file the platform did not serve (an HTTP
error, a stream cut short that dtlpy gives up on after its retries) gets neither its file nor its JSON in the
download, and dtlpy only logs it: the reader would never see it. Counted here against the items each subset's
filter selects, so the loss is a counted skip in the data report, and a subset whose every download failed is one
clear error."""

from __future__ import annotations

import copy
import logging
from pathlib import Path, PurePosixPath

import dtlpy as dl

from adapters.clip_finetune.data.pairs import DataReport
from adapters.clip_finetune.errors import DataError

logger = logging.getLogger(__name__)

FAILED = "download failed"


def failed_downloads(model: dl.Model, root: Path) -> dict[str, list[str]]:
    """{subset: ids of the items its filter selects whose file and JSON are not in root/<subset>} for the model's
    subsets (metadata.system.subsets, what prepare_data downloaded); a subset missing nothing is left out."""
    subsets = ((model.metadata or {}).get("system") or {}).get("subsets") or {}
    out = {}
    for subset, dql in subsets.items():
        json_root = root / subset / "json"
        have = {p.relative_to(json_root).with_suffix("").as_posix() for p in json_root.rglob("*.json")} \
            if json_root.is_dir() else set()
        # the filter prepare_data downloaded with (a Filters of the subset's DQL), so the same items
        pages = model.dataset.items.list(filters=dl.Filters(custom_filter=copy.deepcopy(dql)))
        if pages.items_count <= len(have):  # the common case: one query, no listing
            continue
        missing = [item.id for page in pages for item in page
                   if item.type != "dir" and _json_name(item.filename) not in have]
        if missing:
            out[subset] = missing
    return out


def _json_name(filename: str) -> str:
    """json/<path without extension>.json is where dtlpy writes an item's JSON: the key without '.json'."""
    return PurePosixPath(filename.lstrip("/")).with_suffix("").as_posix()


def check_downloads(failed: dict[str, list[str]], root: Path) -> None:
    """DataError for a subset none of whose items downloaded: training on it is impossible, and the reader would
    only say the subset is empty."""
    for subset, ids in failed.items():
        json_root = root / subset / "json"
        if not json_root.is_dir() or next(json_root.rglob("*.json"), None) is None:
            raise DataError(f"subset {subset!r}: every download failed ({len(ids)} items selected, none downloaded, "
                            f"e.g. {', '.join(ids[:3])}); the platform did not serve their files (HTTP errors or "
                            "cut streams; dtlpy's download log names each). Retry the training, or check the items' "
                            "storage")


def count_failed(failed: dict[str, list[str]], reports: dict[str, DataReport]) -> None:
    """Each failed download as a skip in its subset's report (the data report then adds up to the subset)."""
    for subset, ids in failed.items():
        report = reports.setdefault(subset, DataReport())
        for item_id in ids:
            report.skip(FAILED, item_id)
        logger.warning("subset %s: %d items could not be downloaded and are skipped (e.g. %s)", subset, len(ids),
                       ", ".join(ids[:5]))
