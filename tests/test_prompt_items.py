"""Captioned image items become prompt items (image prompt + free-text answer) and back, through the real
dtlpy client against the platform stand-in; the prompt items read back as training pairs."""

from __future__ import annotations

import json

import dtlpy as dl
from loopback_platform import LoopbackPlatform, dtlpy_pointed_at, png_bytes

from adapters.clip_finetune.data.dataloop import read_subset
from adapters.clip_finetune.dataloop.prompts import captions_to_prompt_items, prompt_items_to_captions

CAPTIONS = {"red.png": "a red square", "blue.png": "a blue square", "bare.png": None}


def _seed(platform: LoopbackPlatform) -> tuple[dl.Dataset, dict[str, dict]]:
    project = platform.add_project()
    dataset = platform.add_dataset(project["id"], "shapes")
    items = {name: platform.add_item(dataset["id"], png_bytes((200, 30 * i, 30)), f"/images/{name}",
                                     description=caption)
             for i, (name, caption) in enumerate(CAPTIONS.items())}
    return dl.datasets.get(dataset_id=dataset["id"]), items


def test_captions_become_prompt_items_and_go_back(tmp_path) -> None:
    with LoopbackPlatform() as platform, dtlpy_pointed_at(platform):
        dataset, items = _seed(platform)
        made = captions_to_prompt_items(dataset, filters={"filter": {"dir": "/images"}})
        assert sorted(p.name for p in made) == ["blue.json", "red.json"]  # bare.png has no caption
        by_name = {p.name: p for p in made}
        stored = platform.item(by_name["red.json"].id)
        assert stored["metadata"]["system"]["shebang"] == {"dltype": "prompt"} and stored["dir"] == "/prompts"
        content = json.loads(platform.item_bytes(by_name["red.json"].id))
        red_stream = platform.stream_url(items["red.png"]["id"])
        assert content["prompts"]["1"][0] == {"mimetype": "image/*", "value": red_stream}
        [answer] = platform.item_annotations(by_name["red.json"].id)
        assert (answer["type"], answer["label"], answer["coordinates"]) == ("text", "free-text", "a red square")
        assert answer["metadata"]["system"]["promptId"] == "1"

        # the prompt items train: downloaded as the platform gives them, they read as the same pairs
        folder = tmp_path / "download"
        list(dataset.items.download(filters=dl.Filters(field="dir", values="/prompts"), local_path=str(folder),
                                    annotation_options=dl.ViewAnnotationOptions.JSON))
        resolver_calls = []

        def resolver(refs: list[str]) -> dict[str, str]:  # as the adapter's: the images by item id
            resolver_calls.append(refs)
            for ref in refs:
                (tmp_path / f"{ref}.png").write_bytes(platform.item_bytes(ref))
            return {ref: str(tmp_path / f"{ref}.png") for ref in refs}

        pairs = read_subset(folder, resolver)
        assert sorted(p.caption for p in pairs) == ["a blue square", "a red square"]
        assert sorted(resolver_calls[0]) == sorted([items["red.png"]["id"], items["blue.png"]["id"]])

        # and back: descriptions cleared, then written again from the prompt items' answers
        for name in ("red.png", "blue.png"):
            dl.items.get(item_id=items[name]["id"]).set_description("")
        dl.items.get(item_id=items["blue.png"]["id"]).set_description("kept")
        assert prompt_items_to_captions(dataset) == 1  # blue keeps its description
        assert platform.item(items["red.png"]["id"])["description"] == "a red square"
        assert platform.item(items["blue.png"]["id"])["description"] == "kept"
        assert prompt_items_to_captions(dataset, overwrite=True) == 2
        assert platform.item(items["blue.png"]["id"])["description"] == "a blue square"
