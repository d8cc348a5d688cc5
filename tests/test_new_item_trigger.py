"""New items embedded by themselves: the app's item-created trigger (dataloop.json components.triggers, on the
clip-nodes service) embeds an item uploaded through the real dtlpy client with its dataset's search model, as the
loopback platform fires it the way the platform does (tests/loopback_platform/triggers.py); an item already
embedded by that model is skipped, and so are items the trigger's filter does not select and items of datasets no
model embedded yet.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, REPO, image_bytes
from loopback_platform import JSON, LoopbackPlatform, dtlpy_pointed_at

from adapters.clip_finetune.data.synthetic import SyntheticSample, render
from adapters.clip_finetune.dataloop.adapter import ClipAdapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

APP = json.loads((REPO / "dataloop.json").read_text())
(TRIGGER,) = APP["components"]["triggers"]


@dataclass
class Project:
    platform: LoopbackPlatform
    project_id: str
    dataset: JSON
    models: list[str]  # two models of the app; the first embedded the dataset (its search model)
    service: dl.Service
    folder: Path


def _circle_png(folder: Path, colour: str) -> Path:
    attributes = {"colour": colour, "shape": "circle", "size": "large", "position": "centre", "background": "white"}
    path = folder / f"{colour}.png"
    path.write_bytes(image_bytes(render(SyntheticSample(attributes, colour, (colour,), zlib.crc32(colour.encode())))))
    return path


def _embed_dataset(p: Project, model_id: str, dataset_id: str) -> None:
    """The app's Embed dataset function on its clip-nodes service (as the pipeline's node runs it)."""
    execution = p.service.execute(function_name="embed_dataset", project_id=p.project_id, execution_input={
        "model": {"model_id": model_id}, "dataset": {"dataset_id": dataset_id}}).wait()
    assert execution.latest_status["status"] == "success", execution.latest_status


def _upload(p: Project, dataset_id: str, path: Path) -> tuple[dl.Item, list[dl.Execution]]:
    """Upload through dtlpy; the item and the trigger executions its creation started, finished."""
    before = len(p.platform.trigger_executions)
    item = dl.datasets.get(dataset_id=dataset_id).items.upload(local_path=str(path), remote_path="/new")
    started = p.platform.trigger_executions[before:]
    return item, [dl.executions.get(execution_id=e["id"]).wait() for e in started]


def _vectors_of(p: Project, model_id: str, item_id: str) -> list[list[float]]:
    feature_sets = p.platform.model_feature_sets(model_id)
    return [v["value"] for fs in feature_sets for v in p.platform.vectors(fs["id"]) if v["entityId"] == item_id]


def _image_vector(model_id: str, item: dl.Item) -> list[float]:
    """The Python image tower's vector of the item (nothing stored)."""
    _, (vector,) = ClipAdapter(model_entity=dl.models.get(model_id=model_id)).embed_items([item],
                                                                                         upload_features=False)
    return list(vector)


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    folder = tmp_path_factory.mktemp("trigger")
    with LoopbackPlatform() as platform, pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        with dtlpy_pointed_at(platform):
            pid = platform.add_project()["id"]
            dataset = platform.add_dataset(pid, "catalogue")
            for colour in ("red", "blue"):
                platform.add_item(dataset["id"], _circle_png(folder, colour).read_bytes(), f"/{colour}.png")
            app = platform.install_app(pid, APP, REPO)
            models = [platform.add_model(pid, name, {**QUICK_CONFIG, "seed": seed}, dataset["id"], package_id=app.id,
                                         module_name="clip-finetune-module")["id"]
                      for name, seed in (("clip-tiny", 0), ("clip-tiny-promoted", 7))]
            service = dl.services.get(service_id=platform.service_for(app, "clip_nodes", "clip-nodes")["id"])
            p = Project(platform, pid, dataset, models, service, folder)
            _embed_dataset(p, models[0], dataset["id"])
            yield p


@pytest.fixture
def shared(project: Project) -> Iterator[Project]:
    with dtlpy_pointed_at(project.platform):
        yield project


def test_a_new_image_gets_a_vector_from_the_datasets_search_model(shared: Project) -> None:
    item, (execution,) = _upload(shared, shared.dataset["id"], _circle_png(shared.folder, "green"))
    assert execution.latest_status["status"] == "success", execution.latest_status
    assert execution.function_name == TRIGGER["spec"]["operation"]["functionName"] == "embed_item"
    assert execution.input["item"]["item_id"] == item.id  # the item as the function's Item input
    (vector,) = _vectors_of(shared, shared.models[0], item.id)
    assert _cosine(vector, _image_vector(shared.models[0], item)) >= 0.999
    assert _vectors_of(shared, shared.models[1], item.id) == []


def test_an_item_the_model_already_embedded_is_skipped(shared: Project) -> None:
    item, _ = _upload(shared, shared.dataset["id"], _circle_png(shared.folder, "yellow"))
    posts = len(shared.platform.calls_to("POST", r"^/features/vectors$"))
    again = shared.service.execute(function_name="embed_item", project_id=shared.project_id,
                                   execution_input={"item": {"item_id": item.id}}).wait()
    assert again.latest_status["status"] == "success", again.latest_status
    assert again.latest_status["message"] == "item /new/yellow.png: already embedded"
    assert len(shared.platform.calls_to("POST", r"^/features/vectors$")) == posts
    assert len(_vectors_of(shared, shared.models[0], item.id)) == 1


def test_after_a_promotion_new_items_get_the_promoted_models_vector(shared: Project) -> None:
    _embed_dataset(shared, shared.models[1], shared.dataset["id"])  # the pipeline's Embed dataset after "promoted"
    item, (execution,) = _upload(shared, shared.dataset["id"], _circle_png(shared.folder, "purple"))
    assert execution.latest_status["status"] == "success", execution.latest_status
    (vector,) = _vectors_of(shared, shared.models[1], item.id)
    assert _cosine(vector, _image_vector(shared.models[1], item)) >= 0.999
    assert _vectors_of(shared, shared.models[0], item.id) == []


def test_files_the_filter_does_not_select_start_nothing(shared: Project) -> None:
    text = shared.folder / "notes.txt"
    text.write_text("not an image")
    _, executions = _upload(shared, shared.dataset["id"], text)
    assert executions == []  # the trigger's filter: image mimetypes


def test_an_item_of_a_dataset_no_model_embedded_is_skipped_saying_why(shared: Project) -> None:
    other = shared.platform.add_dataset(shared.project_id, "unsearched")
    item, (execution,) = _upload(shared, other["id"], _circle_png(shared.folder, "orange"))
    assert execution.latest_status["status"] == "success"
    assert execution.latest_status["message"] == "item /new/orange.png: no search model"
    assert not [v for fs in shared.platform.feature_sets.values() for v in shared.platform.vectors(fs["id"])
                if v["entityId"] == item.id]


def test_the_trigger_is_declared_as_the_platform_reads_it() -> None:
    assert TRIGGER["type"] == "Event" and TRIGGER["namespace"] == "services.clip-nodes"
    assert TRIGGER["spec"]["resource"] == "Item" and TRIGGER["spec"]["actions"] == ["Created"]
    (service,) = [s for s in APP["components"]["services"] if s["name"] == "clip-nodes"]
    (module,) = [m for m in APP["components"]["modules"] if m["name"] == service["moduleName"]]
    assert TRIGGER["spec"]["operation"]["functionName"] in {f["name"] for f in module["functions"]}
    dl.Trigger.from_json(_json={**TRIGGER, "id": "t", "projectId": "p"}, client_api=dl.client_api, project=None)


def test_a_recorded_model_that_was_deleted_fails_the_execution_saying_what_to_do(shared: Project) -> None:
    other = shared.platform.add_dataset(shared.project_id, "orphaned")
    dataset = dl.datasets.get(dataset_id=other["id"])
    dataset.metadata.setdefault("user", {})["clip_finetune"] = {"search": {"model_id": "0" * 24}}
    dataset.update()
    _, (execution,) = _upload(shared, other["id"], _circle_png(shared.folder, "red"))
    assert execution.latest_status["status"] == "failed"
    assert "does not exist" in execution.latest_status["message"]
    assert "Embed dataset again" in execution.latest_status["message"]
