"""The dataset browser's Tuned CLIP search panel (panels/tuned-clip-search/search.js) in a real headless
Chromium, against the loopback platform through a fake of the panel runtime's `dl` (tests/search_panel_browser.py):
the query it returns carries the text vector of the dataset's search model (or of the model the user picks), in
the DQL shape of Dataloop's own CLIP panel, and that query, run by the platform, ranks a planted item first.

The data was seeded and embedded with the real dtlpy client: the app's embed_dataset function, executed on its
clip-nodes service, filled the feature set and recorded the dataset's search model.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, REPO, image_bytes
from loopback_platform import JSON, LoopbackPlatform, dtlpy_pointed_at
from search_panel_browser import PANEL_SCRIPT, panel_browser, run_panel

from adapters.clip_finetune.data.synthetic import SyntheticSample, render
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.dataloop.search import embed_dataset, search_query

pytestmark = pytest.mark.usefixtures("one_torch_thread")

APP = json.loads((REPO / "dataloop.json").read_text())
COLOURS = ("red", "yellow", "green", "blue")
PLANTED = "a planted query"


@dataclass
class Searched:
    platform: LoopbackPlatform
    project_id: str
    dataset: JSON
    model_id: str  # the dataset's search model (recorded by embed_dataset)
    other_id: str  # another model whose feature set is filled, not recorded: one the user may pick
    target_id: str  # the item whose vector is the planted query's
    browser: Any


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _text_vector(model_id: str, text: str) -> list[float]:
    """The Python text tower's unit vector of `text` (the adapter the app's functions embed with)."""
    (vector,) = ClipAdapter(model_entity=dl.models.get(model_id=model_id)).embed([text])
    return list(vector)


def _plant(model_id: str, item_id: str, text: str) -> None:
    """Give the item the text's vector in the model's feature set, through dtlpy: the nearest item to `text`."""
    feature_set = dl.models.get(model_id=model_id).feature_set
    filters = dl.Filters(resource=dl.FiltersResource.FEATURE, field="entityId", values=item_id)
    for page in feature_set.features.list(filters=filters):
        for feature in page:
            feature_set.features.delete(feature_id=feature.id)
    feature_set.features.create(value=_text_vector(model_id, text), entity=dl.items.get(item_id=item_id))


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Searched]:
    with LoopbackPlatform() as platform, pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("panel"))
        with dtlpy_pointed_at(platform), panel_browser() as browser:
            pid = platform.add_project()["id"]
            dataset = platform.add_dataset(pid, "catalogue")
            for colour in COLOURS:
                attributes = {"colour": colour, "shape": "circle", "size": "large", "position": "centre",
                              "background": "white"}
                spec = SyntheticSample(attributes, f"a {colour} circle", (f"a {colour} circle",), zlib.crc32(
                    colour.encode()))
                platform.add_item(dataset["id"], image_bytes(render(spec)), f"/{colour}.png")
            app = platform.install_app(pid, APP, REPO)
            models = [platform.add_model(pid, name, {**QUICK_CONFIG, "seed": seed}, dataset["id"], package_id=app.id,
                                         module_name="clip-finetune-module")["id"]
                      for name, seed in (("clip-tiny", 0), ("clip-tiny-other", 7))]
            service = dl.services.get(service_id=platform.service_for(app, "clip_nodes", "clip-nodes")["id"])
            execution = service.execute(function_name="embed_dataset", project_id=pid, execution_input={
                "model": {"model_id": models[0]}, "dataset": {"dataset_id": dataset["id"]}}).wait()
            assert execution.latest_status["status"] == "success", execution.latest_status
            embed_dataset(dl.models.get(model_id=models[1]), dl.datasets.get(dataset_id=dataset["id"]))
            target = next(i["id"] for i in platform.dataset_items(dataset["id"]) if i["filename"] == "/green.png")
            _plant(models[0], target, PLANTED)
            yield Searched(platform, pid, dataset, models[0], models[1], target, browser)


@pytest.fixture
def shared(searched: Searched) -> Iterator[Searched]:
    with dtlpy_pointed_at(searched.platform):
        yield searched


def _panel(s: Searched, form: dict[str, str], items_query: JSON | None = None) -> JSON:
    return run_panel(s.browser, s.platform, s.project_id, s.dataset["id"], form, items_query)


def test_the_panel_query_carries_the_search_models_text_vector(shared: Searched) -> None:
    out = _panel(shared, {"Text Box": "a blue circle", "Model": ""})
    query = out["query"]
    vector = query["join"]["filter"]["value"]["$euclid"]["input"]
    assert _cosine(vector, _text_vector(shared.model_id, "a blue circle")) >= 0.999
    feature_set = dl.models.get(model_id=shared.model_id).feature_set
    # the DQL of Dataloop's own CLIP panel (clip-smart-search entire.js), with this model's vector and feature set
    assert query == search_query(vector, feature_set.id, shared.dataset["id"], 1000)
    assert out["events"] == []  # every item has a vector: no warning
    assert [c.split(" ")[0] for c in out["calls"][:3]] == ["GET", "POST", "GET"]  # dataset, execution, its status


def test_the_query_the_panel_returns_ranks_the_planted_item_first(shared: Searched) -> None:
    out = _panel(shared, {"Text Box": PLANTED})
    query = out["query"]
    assert out["ms"] < 60_000  # a warm service answers at once (docs/dataloop.md: 0.4-0.7 s here)
    dataset = dl.datasets.get(dataset_id=shared.dataset["id"])
    ranked = list(dataset.items.list(filters=dl.Filters(custom_filter=query)).items)
    assert ranked[0].id == shared.target_id
    assert len(ranked) == len(COLOURS)


def test_a_model_the_user_picks_embeds_the_query_against_its_own_feature_set(shared: Searched) -> None:
    query = _panel(shared, {"Text Box": "a red circle", "Model": f"  {shared.other_id} "})["query"]
    vector = query["join"]["filter"]["value"]["$euclid"]["input"]
    assert query["join"]["filter"]["featureSetId"] == dl.models.get(model_id=shared.other_id).feature_set.id
    assert _cosine(vector, _text_vector(shared.other_id, "a red circle")) >= 0.999
    assert _cosine(vector, _text_vector(shared.model_id, "a red circle")) < 0.99  # not the search model's


def test_the_browsers_own_filter_is_kept(shared: Searched) -> None:
    narrowed = {"filter": {"$and": [{"hidden": False}, {"type": "file"}, {"filename": "/red.png"}]},
                "resource": "items"}
    query = _panel(shared, {"Text Box": PLANTED}, narrowed)["query"]
    ranked = list(dl.datasets.get(dataset_id=shared.dataset["id"]).items.list(
        filters=dl.Filters(custom_filter=query)).items)
    assert query["filter"] == narrowed["filter"] and [i.filename for i in ranked] == ["/red.png"]


def test_an_empty_query_leaves_the_browser_as_it_is_and_says_why(shared: Searched) -> None:
    out = _panel(shared, {"Text Box": "   "})
    assert out["query"] == {"filter": {"$and": [{"hidden": False}, {"type": "file"}]}, "resource": "items"}
    assert [e["payload"]["type"] for e in out["events"]] == ["error"]
    assert "type what to look for" in out["events"][0]["payload"]["message"]
    assert not [c for c in out["calls"] if c.startswith("POST /executions")]  # no execution for nothing


def test_a_dataset_no_model_embedded_says_how_to_get_one(shared: Searched) -> None:
    other = shared.platform.add_dataset(shared.project_id, "not embedded")
    out = run_panel(shared.browser, shared.platform, shared.project_id, other["id"], {"Text Box": "a red circle"})
    assert "join" not in out["query"]
    (event,) = out["events"]
    assert event["payload"]["type"] == "error"
    assert "has no search model yet" in event["payload"]["message"] and "pipeline" in event["payload"]["message"]


def test_items_without_a_vector_are_counted_in_a_warning(shared: Searched) -> None:
    added = shared.platform.add_item(shared.dataset["id"], b"\x89PNG not embedded", "/late.png")  # seeded: no trigger
    try:
        out = _panel(shared, {"Text Box": "a red circle"})
    finally:
        shared.platform.items.pop(added["id"])
    (event,) = out["events"]
    assert event["payload"]["type"] == "warning" and "1 of 5 items have no vector" in event["payload"]["message"]


def test_the_panel_and_its_toolbar_load_with_dtlpy_and_name_the_script() -> None:
    dpk = dl.Dpk.from_json(_json=json.loads(json.dumps(APP)))
    (panel,) = dpk.components.panels
    (toolbar,) = dpk.components.toolbars
    (slot,) = APP["components"]["panels"][0]["supportedSlots"]
    assert slot["type"] == "datasetBrowserSearch"  # clip-smart-search's slot and toolbar location
    assert toolbar.location == "datasetBrowserSearchOption" and toolbar.invoke == {"type": "panel",
                                                                                    "namespace": panel.name}
    invoke = slot["configuration"]["invoke"]
    assert invoke["type"] == "script" and "async function run(textInput, itemsQuery)" in PANEL_SCRIPT.read_text()
    assert invoke["namespace"] == "run"
    # the script at the app's release tag (the publish step sets owner and tag with the version)
    assert invoke["source"].endswith(f"/refs/tags/v{APP['version']}/{PANEL_SCRIPT.relative_to(REPO)}")
    fields = [f["name"] for f in slot["configuration"]["layout"]["schema"]["fields"]]
    assert fields == ["Text Box", "Model"] and all(f'field("{f}")' in PANEL_SCRIPT.read_text() for f in fields)
