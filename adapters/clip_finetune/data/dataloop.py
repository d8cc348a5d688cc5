"""The reader of a Dataloop subset download (`items/` + `json/`, what `dataset.download` and a model's
`train_model` give): plain image items captioned by their description (or, without one, by their class, box
or polygon labels through a template), and prompt items captioned by free-text annotations.

Platform-free on purpose (no dtlpy): the Dataloop adapter downloads, these functions only read files; the
layouts are described in docs/dataloop.md. Items that cannot be used are skipped and counted in a
`DataReport`, never raised for one at a time.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..inputs import MAX_JSON_BYTES, Unreadable, file_problem, read_json
from ..progress import progress as show_progress
from .labels import DEFAULT_TEMPLATE, annotation_labels, label_leaf, label_pairs
from .pairs import CaptionPair, DataReport
from .safe_read import image_problem, links_out

logger = logging.getLogger(__name__)

ImageResolver = Callable[[list[str]], dict[str, str]]
"""Given image references missing from the download (item ids, or external URLs), return {ref: local path}
for those it could fetch, in one bulk call. Refs it could not fetch are simply absent."""


PROGRESS_FROM = 2000  # items in a subset download from which reading it shows progress
_STREAM_URL = re.compile(r"/items/([0-9a-fA-F]{24})/stream\b")


def image_ref(value: str) -> str:
    """The reference a prompt's image value stands for: the item id of a Dataloop stream URL or of a bare
    id; any other value (an external URL) unchanged."""
    value = value.strip()
    m = _STREAM_URL.search(value)
    if m:
        return m.group(1)
    return value


def item_caption(record: dict[str, Any]) -> str | None:
    """Caption of a plain image item: the first non-empty of `description`, `metadata.system.description`
    and `metadata.description.text` (older data), stripped; None when there is none."""
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    legacy = meta.get("description")
    candidates = (
        record.get("description"),
        _get(meta, "system", "description"),
        legacy.get("text") if isinstance(legacy, dict) else legacy,
    )
    for c in candidates:
        if isinstance(c, str) and c.strip():
            return c.strip()
    return None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


# --- Dataloop subset downloads ------------------------------------------------------------------------


@dataclass
class _Record:
    """One item of a subset download: its json/ record and the items/ file it belongs to."""

    item_id: str
    data: dict[str, Any]
    file: Path
    prompt: dict[str, Any] | None = None  # the parsed items/ file, for prompt items


@dataclass
class _PromptRequest:
    """A prompt whose image still has to be found: `ref` is an item id or an external URL."""

    item_id: str
    key: str
    ref: str
    captions: list[str] = field(default_factory=list)


def read_subset(
    folder: str | Path, resolver: ImageResolver | None = None, report: DataReport | None = None,
    label_template: str = DEFAULT_TEMPLATE,
) -> list[CaptionPair]:
    """Pairs of a Dataloop subset download (`folder/items/...` and `folder/json/...`).

    Plain image items give one pair (their description; without one, a pair per distinct label of their
    class/box/polygon annotations, captioned by `label_template`); prompt items give one pair per prompt and
    free-text annotation. Prompt images are looked up in the download first, then fetched with ONE
    `resolver` call. Image files are checked for existence, not decoded.
    """
    folder = Path(folder)
    report = report if report is not None else DataReport()
    records = _read_records(folder, report)
    local_images = {r.item_id: r.file for r in records if r.prompt is None}
    entries: list[CaptionPair | _PromptRequest] = []
    uncaptioned: list[str] = []  # image items without a description: skipped unless a prompt shows them
    for r in records:
        entries += _prompt_requests(r, report) if r.prompt is not None else _plain_pair(r, uncaptioned, label_template)
    requests = [e for e in entries if isinstance(e, _PromptRequest)]
    _skip_unused_images(uncaptioned, {q.ref for q in requests}, report)
    found = _resolve_refs(requests, local_images, resolver)
    pairs: list[CaptionPair] = []
    for e in entries:
        if isinstance(e, CaptionPair):
            pairs.append(e)
        elif e.ref in found:
            pairs += [CaptionPair(found[e.ref], c, e.item_id) for c in e.captions]
        else:
            report.skip("prompt image not found", f"{e.item_id}#{e.key}")
    report.used = len(pairs)
    labelled = {r.item_id for r in records if _get(r.data, "metadata", "user", "clip_finetune", "labelling")}
    report.from_labelling = sum(p.item_id in labelled for p in pairs)
    return pairs


def _read_records(folder: Path, report: DataReport) -> list[_Record]:
    items_root, json_root = folder / "items", folder / "json"
    if not json_root.is_dir():
        if not folder.is_dir():
            raise DataError(f"subset folder {str(folder)!r} does not exist; check the data path")
        if items_root.is_dir() and any(p.is_file() for p in items_root.rglob("*")):
            raise DataError(f"subset folder {str(folder)!r} has items/ but no json/ folder; download the "
                            "subset with its item JSONs (annotation_options JSON) so captions can be read")
        logger.warning("subset folder %s has no json/ folder: treating it as empty", folder)
        return []
    records: dict[str, _Record] = {}
    root = os.path.realpath(folder)  # files whose symlinks lead out of it are never read
    paths = sorted(json_root.rglob("*.json"))
    for json_path in show_progress(paths, f"read {folder.name}", unit="item", enabled=len(paths) >= PROGRESS_FROM):
        rel = json_path.relative_to(json_root)
        data = _read_json(json_path, root)
        if not isinstance(data, dict):
            report.skip(data if isinstance(data, str) else "unreadable json", str(rel))
            continue
        item_id = str(data.get("id") or rel)
        if item_id in records:
            report.skip("duplicate item", item_id)
            continue
        record = _locate(folder, root, rel, data, item_id, report)
        if record is not None:
            records[item_id] = record
    return list(records.values())


def _read_json(path: Path, root: str) -> Any:
    """A download's JSON file, bounded (inputs.read_json); a data report reason (a str) when it cannot be read."""
    if file_problem(path) is None and links_out(path, root):  # a file that cannot be read: read_json says why
        return "json file links out of the download"
    try:
        return read_json(path, MAX_JSON_BYTES)
    except Unreadable as e:
        logger.debug("skipping %s", e)
        return "unreadable json" + ("" if e.kind == "not JSON" else f" ({e.kind})")


def _locate(
    folder: Path, root: str, json_rel: Path, data: dict[str, Any], item_id: str, report: DataReport
) -> _Record | None:
    """Find the items/ file of a json/ record and tell prompt items from plain ones; skip what is unusable."""
    items_root = folder / "items"
    marked_prompt = _get(data, "metadata", "system", "shebang", "dltype") == "prompt"
    filename = data.get("filename")
    file: Path | None = None
    if isinstance(filename, str) and filename.strip("/"):
        file = _inside(items_root, filename.lstrip("/"))
        if file is None:
            report.skip("unsafe path", item_id)
            return None
    problem = "image file missing" if file is None else image_problem(file, root)
    if problem is not None and (by_stem := _by_stem(items_root, json_rel)) is not None:
        file, problem = by_stem, image_problem(by_stem, root)  # a record without filename, or a renamed download
    if file is None or problem is not None:  # missing, a FIFO or device, a folder, a symlink loop or out of root
        problem = problem or "image file missing"
        report.skip(problem.replace("image", "prompt", 1) if marked_prompt else problem, item_id)
        return None
    mimetype = str(_get(data, "metadata", "system", "mimetype") or "")
    if marked_prompt or mimetype == "application/json" or file.suffix.lower() == ".json":
        prompt = _read_json(file, root)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompts"), dict):
            return _Record(item_id, data, file, prompt)
        report.skip("unreadable prompt json" if marked_prompt else "not an image or prompt item", item_id)
        return None
    if mimetype and not mimetype.startswith("image"):
        report.skip("not an image or prompt item", item_id)
        return None
    return _Record(item_id, data, file)


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel, or None when rel climbs out of root ('../'); lexical (symlinks are judged by image_problem)."""
    joined = Path(os.path.normpath(root / rel))
    return joined if joined.is_relative_to(os.path.normpath(root)) else None


def _by_stem(items_root: Path, json_rel: Path) -> Path | None:
    """items/<dir>/<stem>.<any ext> for json/<dir>/<stem>.json (dtlpy names the json after the stem)."""
    folder = items_root / json_rel.parent
    if not folder.is_dir():
        return None
    stem = json_rel.stem
    matches = sorted(p for p in folder.iterdir() if (p.stem == stem or p.name == stem) and p.is_file())
    return matches[0] if matches else None


def _plain_pair(r: _Record, uncaptioned: list[str], label_template: str) -> list[CaptionPair]:
    caption = item_caption(r.data)
    labels = annotation_labels(r.data.get("annotations"))
    if caption is not None:  # a description wins; its first label still scores zero-shot classification
        return [CaptionPair(str(r.file), caption, r.item_id, label_leaf(labels[0]) if labels else "")]
    pairs = label_pairs(str(r.file), labels, r.item_id, label_template)
    if not pairs:
        uncaptioned.append(r.item_id)
    return pairs


def _skip_unused_images(uncaptioned: list[str], prompt_refs: set[str], report: DataReport) -> None:
    """Count image items without a description as skipped, unless they are the images of prompt items (a
    prompt-item dataset keeps its images beside the prompts: they are used, through the prompts' captions)."""
    shown = 0
    for item_id in uncaptioned:
        if item_id in prompt_refs:
            shown += 1
        else:
            report.skip("no caption", item_id)
    if shown:
        logger.info("%d image items without a description are the images of prompt items: used through them", shown)


def _prompt_requests(r: _Record, report: DataReport) -> list[_PromptRequest]:
    """One request per prompt of a prompt item, with the free-text captions annotated for it."""
    prompts: dict[str, Any] = r.prompt or {}
    if not prompts.get("prompts"):
        report.skip("prompt item has no prompts", r.item_id)
        return []
    captions = _captions_by_prompt(r.data.get("annotations"))
    # A free-text answer without a promptId belongs to the first prompt, as Dataloop's own CLIP adapter reads it
    first = str(min(prompts["prompts"], key=prompt_order))
    captions[first] = list(dict.fromkeys(captions.get(first, []) + captions.pop(None, [])))
    requests = []
    for key, elements in prompts["prompts"].items():
        ref = prompt_parts(elements)[0]
        if ref is None:
            report.skip("prompt has no image", f"{r.item_id}#{key}")
        elif not captions.get(str(key)):
            report.skip("no free-text annotation", f"{r.item_id}#{key}")
        else:
            requests.append(_PromptRequest(r.item_id, str(key), image_ref(ref), captions[str(key)]))
    return requests


def prompt_parts(elements: Any) -> tuple[str | None, str | None]:
    """(image value, text) of one prompt's elements: the first non-empty of each, None when absent."""
    image = text = None
    for e in elements if isinstance(elements, list) else []:
        if not isinstance(e, dict):
            continue
        mimetype, value = str(e.get("mimetype", "")), e.get("value")
        if not isinstance(value, str) or not value.strip():
            continue
        if image is None and mimetype.startswith("image"):
            image = value
        elif text is None and (mimetype.startswith("text") or mimetype == "application/text"):
            text = value.strip()
    return image, text


def prompt_order(key: str) -> tuple[int, int, str]:
    """Prompt keys are "1", "2", ...: numeric order, so "10" comes after "9"."""
    return (0, int(key), "") if str(key).isdigit() else (1, 0, str(key))


def _captions_by_prompt(annotations: Any) -> dict[str | None, list[str]]:
    """{promptId: distinct non-empty captions} from the text annotations of a prompt item; key None holds the
    captions annotated without a promptId."""
    out: dict[str | None, list[str]] = {}
    for a in annotations if isinstance(annotations, list) else []:
        if not isinstance(a, dict) or a.get("type") != "text":
            continue
        prompt_id, text = _get(a, "metadata", "system", "promptId"), a.get("coordinates")
        if not isinstance(text, str) or not text.strip():
            continue
        captions = out.setdefault(None if prompt_id is None else str(prompt_id), [])
        if text.strip() not in captions:
            captions.append(text.strip())
    return out


def _resolve_refs(
    requests: list[_PromptRequest], local_images: dict[str, Path], resolver: ImageResolver | None
) -> dict[str, str]:
    """{ref: local path}: images in the download first, then one bulk resolver call for the rest."""
    found = {q.ref: str(local_images[q.ref]) for q in requests if q.ref in local_images}
    missing = list(dict.fromkeys(q.ref for q in requests if q.ref not in found))
    if not missing:
        return found
    if resolver is None:
        logger.warning("%d prompt images are not in the download and no resolver was given", len(missing))
        return found
    fetched = resolver(missing)
    wanted = set(missing)
    found.update({ref: str(p) for ref, p in fetched.items() if ref in wanted and p and Path(p).is_file()})
    return found
