"""The Dataloop app end to end, through the real dtlpy client and the loopback platform: install the app ->
a pipeline from the template -> execute (train, promote, embed) -> a new item is uploaded -> the item-created
trigger gives it a vector from the promoted model -> the search panel's script, in a real headless Chromium,
returns the items ranked by the tuned model, the right item first for each colour's query.

The app is published with the publish command (dtlpy packs and uploads the code; the stand-in's registry checks
the DPK) and installed with `project.apps.install(dpk)`, which runs the uploaded code. Tiny model, random init,
10 epochs: about 40 s on this project's shared 2-core machine.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, REPO, image_bytes
from loopback_platform import JSON, LoopbackPlatform, dtlpy_pointed_at
from loopback_platform.marketplace import install_active_learning
from release_support import release_checkout
from search_panel_browser import panel_browser, run_panel

from adapters.clip_finetune.data.synthetic import SyntheticSample, render
from adapters.clip_finetune.dataloop.publish import main as publish_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

APP = json.loads((REPO / "dataloop.json").read_text())
TEMPLATE = json.loads((REPO / "pipeline_templates" / "clip-finetune-and-embed" / "dataloop.json").read_text())
COLOURS = ("red", "yellow", "green", "blue")
SPLITS = {"train": 6, "validation": 1, "test": 3}


def _circle(colour: str, key: str) -> bytes:
    attributes = {"colour": colour, "shape": "circle", "size": "large", "position": "centre", "background": "white"}
    return image_bytes(render(SyntheticSample(attributes, f"a {colour} circle", (f"a {colour} circle",),
                                              zlib.crc32(key.encode()))))


@dataclass
class Deployed:
    platform: LoopbackPlatform
    project_id: str
    catalogue: JSON
    cycle: dl.PipelineExecution
    promoted_id: str
    new_item: dl.Item
    trigger_execution: dl.Execution


def _deploy(platform: LoopbackPlatform, folder: Path) -> Deployed:
    pid = platform.add_project()["id"]
    captions = platform.add_dataset(pid, "circles")
    for split, n in SPLITS.items():
        for colour in COLOURS:
            for i in range(n):
                platform.add_item(captions["id"], _circle(colour, f"{split}/{colour}/{i}"),
                                  f"/{split}/{colour}-{i}.png", description=f"a {colour} circle", tags=[split])
    catalogue = platform.add_dataset(pid, "catalogue")
    for colour in COLOURS[:3]:  # blue arrives later, as a new item
        platform.add_item(catalogue["id"], _circle(colour, f"catalogue/{colour}"), f"/{colour}.png")
    project = dl.projects.get(project_id=pid)
    assert publish_main(["--version", APP["version"], "--project", project.name,
                         "--root", str(release_checkout(folder / "checkout"))]) == 0
    (published,) = platform.published(APP["name"])
    app = project.apps.install(dpk=dl.Dpk.from_json(published, client_api=dl.client_api, project=project))
    install_active_learning(platform, pid)
    base = platform.add_model(pid, "clip-tiny-base", QUICK_CONFIG, captions["id"], package_id=app.id,
                              module_name="clip-finetune-module")
    pipeline = project.pipelines.get(pipeline_id=platform.install_template(pid, TEMPLATE)["id"])
    pipeline.update_variables_values(**{
        "Dataset with captions": captions["id"], "Dataset to embed": catalogue["id"], "Base CLIP model": base["id"],
        "Newest CLIP model": base["id"], "Model config": {"num_epochs": 10}})
    pipeline.update()
    pipeline.install()
    before = set(platform.models)
    cycle = pipeline.execute().wait()
    (promoted,) = set(platform.models) - before
    (folder / "blue.png").write_bytes(_circle("blue", "catalogue/blue"))
    started = len(platform.trigger_executions)
    new_item = dl.datasets.get(dataset_id=catalogue["id"]).items.upload(local_path=str(folder / "blue.png"))
    (execution,) = [dl.executions.get(execution_id=e["id"]).wait() for e in platform.trigger_executions[started:]]
    return Deployed(platform, pid, catalogue, cycle, promoted, new_item, execution)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    folder = tmp_path_factory.mktemp("end-to-end")
    with LoopbackPlatform() as platform, pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # train_model downloads under ./tmp/
        with dtlpy_pointed_at(platform):
            yield _deploy(platform, folder)


@pytest.fixture
def shared(deployed: Deployed) -> Iterator[Deployed]:
    with dtlpy_pointed_at(deployed.platform):
        yield deployed


def test_the_pipeline_trains_promotes_and_embeds_the_catalogue(deployed: Deployed) -> None:
    platform = deployed.platform
    assert deployed.cycle.status == "success", platform.pipeline_executions[deployed.cycle.id].get("error")
    promotion = platform.model(deployed.promoted_id)["metadata"]["user"]["clip_finetune"]["promotion"]
    assert promotion["promoted"]
    record = platform.dataset(deployed.catalogue["id"])["metadata"]["user"]["clip_finetune"]["search"]
    assert record["model_id"] == deployed.promoted_id


def test_the_new_item_gets_a_vector_from_the_promoted_model(deployed: Deployed) -> None:
    assert deployed.trigger_execution.latest_status["status"] == "success", deployed.trigger_execution.latest_status
    (feature_set,) = deployed.platform.model_feature_sets(deployed.promoted_id)
    assert deployed.new_item.id in {v["entityId"] for v in deployed.platform.vectors(feature_set["id"])}


def test_the_panel_in_a_browser_ranks_the_right_item_first_with_the_tuned_model(shared: Deployed) -> None:
    ranked: dict[str, list[str]] = {}  # colour -> the panel's ranking (filenames) for "a <colour> circle"
    events: list[Any] = []
    with panel_browser() as browser:
        for colour in COLOURS:
            out = run_panel(browser, shared.platform, shared.project_id, shared.catalogue["id"],
                            {"Text Box": f"a {colour} circle"})
            assert out["query"]["join"]["filter"]["featureSetId"] == shared.platform.model_feature_sets(
                shared.promoted_id)[0]["id"]
            items = dl.datasets.get(dataset_id=shared.catalogue["id"]).items.list(
                filters=dl.Filters(custom_filter=out["query"])).items
            ranked[colour], events = [i.filename for i in items], events + out["events"]
    assert {c: r[0] for c, r in ranked.items()} == {c: f"/{c}.png" for c in COLOURS}, ranked
    assert all(len(r) == len(COLOURS) for r in ranked.values())  # every item has a tuned vector, the new one too
    assert events == []  # no warning: nothing is missing a vector
    assert shared.platform.unhandled == []
