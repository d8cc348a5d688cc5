"""Captioned image items <-> prompt items: the two data shapes the app trains on (docs/prompt-items.md).

`captions_to_prompt_items` makes, for each image item with a description, a prompt item whose prompt "1" shows
the image (its stream URL) and whose free-text annotation (promptId "1") is the description, as a labeling
task's reviewed response would be. `prompt_items_to_captions` goes back: the first free-text answer of a
prompt item's first prompt becomes the description of the image item it shows.
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

import dtlpy as dl

from adapters.clip_finetune.data.dataloop import image_ref, item_caption, prompt_parts

from .items import ItemUnusable, first_prompt
from .platform import ITEM_ID, as_filters, is_prompt_item

logger = logging.getLogger(__name__)

FREE_TEXT = "free-text"


def captions_to_prompt_items(dataset: dl.Dataset, filters: dl.Filters | dict | None = None,
                             remote_dir: str = "/prompts", target: dl.Dataset | None = None) -> list[dl.Item]:
    """One prompt item per captioned image item `filters` selects (default: all), uploaded to `target`
    (default: the same dataset) under `remote_dir`; existing prompt items of the same name are replaced.
    Returns the prompt items."""
    target = target or dataset
    made = []
    for item in _items(dataset, filters):
        caption = item_caption(item.to_json())
        if is_prompt_item(item) or not (item.mimetype or "").startswith("image/") or caption is None:
            continue
        prompt = dl.PromptItem(name=f"{PurePosixPath(item.name).stem}.json")
        prompt.add(message={"role": "user", "content": [{"mimetype": dl.PromptType.IMAGE, "value": item.stream}]})
        uploaded = target.items.upload(local_path=prompt, remote_path=remote_dir, overwrite=True)
        annotation = dl.Annotation.new(item=uploaded, annotation_definition=dl.FreeText(text=caption, label=FREE_TEXT),
                                       metadata={"system": {"promptId": "1"}})
        uploaded.annotations.upload([annotation])
        made.append(uploaded)
    logger.info("made %d prompt items from the captioned images of %r", len(made), dataset.name)
    return made


def prompt_items_to_captions(dataset: dl.Dataset, filters: dl.Filters | dict | None = None,
                             overwrite: bool = False) -> int:
    """Write each prompt item's first free-text answer (of its first prompt) as the description of the image
    item that prompt shows; images that already have one keep it unless `overwrite`. Returns how many were
    written; prompt items whose image is not an item (an external URL) or that have no answer are skipped."""
    written = 0
    for item in _items(dataset, filters):
        if not is_prompt_item(item):
            continue
        found = _image_and_caption(item)
        if found is None:
            continue
        image, caption = found
        if image.description and not overwrite:
            logger.info("item %s keeps its description (overwrite=False)", image.id)
            continue
        image.set_description(caption)
        written += 1
    logger.info("wrote %d descriptions from the prompt items of %r", written, dataset.name)
    return written


def _items(dataset: dl.Dataset, filters: dl.Filters | dict | None) -> list[dl.Item]:
    return [item for page in dataset.items.list(filters=as_filters(filters)) for item in page]


def _image_and_caption(item: dl.Item) -> tuple[dl.Item, str] | None:
    try:
        first = first_prompt(item)
    except ItemUnusable:
        logger.warning("prompt item %s: unreadable, skipped", item.id)
        return None
    if first is None:
        return None
    key, elements = first
    image, _ = prompt_parts(elements)
    ref = image_ref(image) if image else ""
    answers = [a.annotation_definition.text for a in item.annotations.list()
               if a.type == "text" and str((a.metadata or {}).get("system", {}).get("promptId")) == str(key)]
    if not ITEM_ID.fullmatch(ref) or not answers or not answers[0].strip():
        logger.info("prompt item %s: no image item or no free-text answer, skipped", item.id)
        return None
    return dl.items.get(item_id=ref), answers[0].strip()
