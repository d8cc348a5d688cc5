"""Items as model input: an image item's bytes, a text item's text, a prompt item's image (fetched by id) or
text; prompt images fetched in bulk for training; and why an item could not be used."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import dtlpy as dl
import torch

from adapters.clip_finetune.app.embed import item_input
from adapters.clip_finetune.data.dataloop import ImageResolver, image_ref, prompt_order, prompt_parts
from adapters.clip_finetune.data.images import ImageDecodeError
from adapters.clip_finetune.inputs import Unreadable, parse_json
from adapters.clip_finetune.model.clip import ClipModel

from .platform import ITEM_ID, PLATFORM_ERRORS, is_prompt_item

logger = logging.getLogger(__name__)

FETCH_THREADS = 16  # as dtlpy's own download pools
PROMPT_IMAGES = ".prompt-images"  # beside the subset folders; the dot keeps it out of the subset scan
_DECODE_PREFIX = re.compile(r"^cannot decode image '.*?': ")  # images.load_image's message starts with the path


class Unusable(NamedTuple):
    """Why an item cannot be turned into model input; embed() yields no vector for it.

    `reason` is the category counted in the embedding report, `detail` says what exactly is wrong with the file.
    A `transient` failure (a download that failed) is not the item's fault: an embedding job fails for it,
    since a re-run can store the vector, whereas a bad item is skipped and listed.
    """

    item_id: str
    reason: str
    detail: str = ""
    transient: bool = False

    def describe(self) -> str:
        return f"{self.item_id} ({self.reason}{': ' + self.detail if self.detail else ''})"


class ItemUnusable(Exception):
    """Raised while preparing an item that cannot be embedded; the message is the reason."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


PreparedItem = torch.Tensor | str | Unusable | None  # image tensor [3, H, W] | text | why not


def prepare_item(clip: ClipModel, item: dl.Item) -> PreparedItem:
    """An image item becomes its preprocessed tensor (the one embedding pipeline, retrieval/embed.py), a text
    item its text, a prompt item its image (fetched by id) or, without one, its text; else why not."""
    try:
        if is_prompt_item(item):
            return _prompt_input(clip, item)
        if (item.mimetype or "").startswith("text/"):
            return download_bytes(item).decode("utf-8", "replace").strip()
        if not (item.mimetype or "").startswith("image/"):
            raise ItemUnusable(f"unsupported mimetype {item.mimetype!r}")
        return item_input(clip, download_bytes(item), Path(item.name or "image").name)
    except ItemUnusable as e:
        return Unusable(item.id, str(e), transient=e.transient)
    except ImageDecodeError as e:
        return Unusable(item.id, "undecodable image", decode_detail(e))
    except dl.exceptions.NotFound:  # a prompt's image item was deleted: no re-run will find it
        return Unusable(item.id, "prompt image not found")
    except PLATFORM_ERRORS as e:
        return Unusable(item.id, f"download failed ({type(e).__name__})", transient=True)


def first_prompt(item: dl.Item) -> tuple[str, Any] | None:
    """(key, elements) of a prompt item's first prompt (numeric order), None when it has no prompts;
    ItemUnusable when its JSON cannot be downloaded or read."""
    try:
        content = parse_json(download_bytes(item), f"prompt item {item.id}")  # nesting bounded, encoding named
    except Unreadable:
        raise ItemUnusable("unreadable prompt json") from None
    prompts = (content.get("prompts") if isinstance(content, dict) else None) or {}
    if not prompts:
        return None
    key = min(prompts, key=prompt_order)
    return key, prompts[key]


def _prompt_input(clip: ClipModel, item: dl.Item) -> torch.Tensor | str:
    """The first prompt's image (by item id), else its text."""
    first = first_prompt(item)
    image, text = prompt_parts(first[1] if first is not None else [])
    if image is not None:
        ref = image_ref(image)
        if not ITEM_ID.fullmatch(ref):
            raise ItemUnusable("prompt image is an external URL")
        image_item = dl.items.get(item_id=ref)
        return item_input(clip, download_bytes(image_item), Path(image_item.name or "image").name)
    if text:
        return text
    raise ItemUnusable("prompt has no image or text")


def download_bytes(item: dl.Item) -> bytes:
    buffer = item.download(save_locally=False)
    if buffer is None:  # dtlpy logged why
        raise ItemUnusable("download failed", transient=True)
    return buffer.getvalue()


def decode_detail(e: ImageDecodeError) -> str:
    """Why an image could not be decoded, without the name it was decoded under."""
    return _DECODE_PREFIX.sub("", str(e)).removesuffix("; re-export the file or remove it")


def item_resolver(folder: Path) -> ImageResolver:
    """An ImageResolver that fetches prompt images by item id, in parallel, into folder/<item id>/."""

    def resolve(refs: list[str]) -> dict[str, str]:
        ids = [r for r in refs if ITEM_ID.fullmatch(r)]
        if len(ids) < len(refs):
            logger.warning("%d prompt images are external URLs: not fetched", len(refs) - len(ids))
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            paths = list(pool.map(lambda item_id: fetch_item(item_id, folder / item_id), ids))
        found = {ref: path for ref, path in zip(ids, paths, strict=True) if path}
        logger.info("fetched %d of %d prompt images by item id", len(found), len(ids))
        return found

    return resolve


def fetch_item(item_id: str, folder: Path) -> str | None:
    """Download one item into `folder` (kept for other subsets); None when it cannot be had."""
    done = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if done:
        return str(done[0])
    try:
        path = dl.items.get(item_id=item_id).download(local_path=str(folder), overwrite=True)
    except PLATFORM_ERRORS as e:  # e.g. NotFound: the image item was deleted
        logger.warning("cannot fetch item %s: %s", item_id, e)
        return None
    # item.download logs and returns None instead of raising when the transfer fails
    return path if isinstance(path, str) and Path(path).is_file() else None
