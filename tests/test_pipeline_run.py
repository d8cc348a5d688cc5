"""The pipeline template run through the real dtlpy client on the loopback platform, which executes pipelines
(tests/loopback_platform/pipelines.py): `pipeline.execute()` and nothing else trains a new model, compares it on
the test subset, promotes it only when it is better, and fills the search dataset's vectors with the winner, which
a text search then ranks with.

One project is run twice (module scope): the first run trains a model that beats the random-init base and is
promoted; the second trains one that cannot (a learning rate that leaves it the base) and is not.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, REPO, image_bytes
from loopback_platform import JSON, LoopbackPlatform, dtlpy_pointed_at
from loopback_platform.marketplace import install_active_learning

from adapters.clip_finetune.data.synthetic import SyntheticSample, render
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.dataloop.search import embed_dataset, search

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE = json.loads((REPO / "pipeline_templates" / "clip-finetune-and-embed" / "dataloop.json").read_text())
APP = json.loads((REPO / "dataloop.json").read_text())
# A learnable set: circles of four far-apart colours, rendered with jitter; "a red circle" fits only the red ones.
COLOURS = ("red", "yellow", "green", "blue")
PER_COLOUR = {"train": 6, "validation": 1, "test": 3}
BASE_CONFIG = {**QUICK_CONFIG, "predict_embed_subset_limit": 2}  # 4 items to search: subsets fanned out
GOOD = {"num_epochs": 10}
WORSE = {"num_epochs": 1, "learning_rate": 1e-9}  # stays the random-init base


def circle(colour: str, seed: int) -> SyntheticSample:
    attributes = {"colour": colour, "shape": "circle", "size": "large", "position": "centre", "background": "white"}
    return SyntheticSample(attributes, f"a {colour} circle", (f"a {colour} circle",), seed)


def seed_circles(platform: LoopbackPlatform, project_id: str, name: str, per_colour: dict[str, int]) -> JSON:
    """A dataset of circles captioned by colour, tagged with their split."""
    dataset = platform.add_dataset(project_id, name)
    for split, n in per_colour.items():
        for colour in COLOURS:
            for i in range(n):
                spec = circle(colour, zlib.crc32(f"{name}/{split}/{colour}/{i}".encode()))
                platform.add_item(dataset["id"], image_bytes(render(spec)), f"/{split}/{colour}-{i}.png",
                                  description=spec.caption, tags=[split] if split != "search" else [])
    return dataset


@dataclass
class Project:
    platform: LoopbackPlatform
    captions: JSON  # the dataset with captions (train/validation/test)
    catalogue: JSON  # the dataset to embed and search: one circle per colour
    base_id: str
    pipeline_id: str
    runs: list[dict[str, Any]]  # per execute(): the cycle, the model it created, the newest model after it


def _run(platform: LoopbackPlatform, pipeline_id: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """Set the Model config variable, then project.pipelines.get(...).execute() and wait, all through dtlpy."""
    before, vectors_before = set(platform.models), len(platform.feature_vectors)
    project = dl.projects.get(project_id=platform.pipelines[pipeline_id]["projectId"])
    pipeline = project.pipelines.get(pipeline_id=pipeline_id)
    pipeline.update_variables_values(**{"Model config": model_config})
    pipeline.update()
    execution = pipeline.execute()
    execution = execution.wait()
    (created,) = set(platform.models) - before
    newest = _variable(project.pipelines.get(pipeline_id=pipeline_id), "Newest CLIP model")
    return {"status": execution.status, "cycle": platform.pipeline_executions[execution.id], "model": created,
            "newest": newest, "vectors_added": len(platform.feature_vectors) - vectors_before}


def _variable(pipeline: dl.Pipeline, name: str) -> Any:
    return next(v.value for v in pipeline.variables if v.name == name)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    with LoopbackPlatform() as platform, pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("pipeline"))  # train_model downloads under ./tmp/
        with dtlpy_pointed_at(platform):
            pid = platform.add_project()["id"]
            captions = seed_circles(platform, pid, "circles", PER_COLOUR)
            catalogue = seed_circles(platform, pid, "catalogue", {"search": 1})
            app = platform.install_app(pid, APP, REPO)
            install_active_learning(platform, pid)
            base = platform.add_model(pid, "clip-tiny-base", BASE_CONFIG, captions["id"], package_id=app.id,
                                      module_name="clip-finetune-module")
            created = platform.install_template(pid, TEMPLATE)
            pipeline = dl.projects.get(project_id=pid).pipelines.get(pipeline_id=created["id"])
            pipeline.update_variables_values(**{
                "Dataset with captions": captions["id"], "Dataset to embed": catalogue["id"],
                "Base CLIP model": base["id"], "Newest CLIP model": base["id"]})
            pipeline.update()
            pipeline.install()
            # search used the base model so far: its feature set is filled (and superseded by the first run)
            embed_dataset(dl.models.get(model_id=base["id"]), dl.datasets.get(dataset_id=catalogue["id"]))
            runs = [_run(platform, created["id"], GOOD), _run(platform, created["id"], WORSE)]
            yield Project(platform, captions, catalogue, base["id"], created["id"], runs)


@pytest.fixture
def shared(project: Project) -> Iterator[Project]:
    with dtlpy_pointed_at(project.platform):
        yield project


def test_install_time_defaults_bind_the_app_models(platform: LoopbackPlatform) -> None:
    pid = platform.add_project()["id"]
    app = platform.install_app(pid, APP, REPO)
    install_active_learning(platform, pid)
    pipeline = dl.projects.get(project_id=pid).pipelines.get(pipeline_id=platform.install_template(pid, TEMPLATE)["id"])
    models = platform.app_models(app)
    assert _variable(pipeline, "Base CLIP model") == models["openclip-vit-b-32"]
    assert _variable(pipeline, "Newest CLIP model") == models["openclip-vit-b-32"]
    assert _variable(pipeline, "Dataset with captions") is None  # the user picks the datasets


def test_a_better_model_is_trained_compared_promoted_and_fills_the_search_vectors(shared: Project) -> None:
    platform, run = shared.platform, shared.runs[0]
    assert run["status"] == "success", run["cycle"].get("error")
    assert [n["name"] for n in run["cycle"]["nodes"]] == [
        "Create New Model", "Fine-tune CLIP", "Promote if better", "Update Variable", "Embed dataset"]
    model = platform.model(run["model"])
    assert model["status"] == "trained" and platform.artifact_files(model["id"])
    verdict = model["metadata"]["user"]["clip_finetune"]["promotion"]
    assert verdict["promoted"] and verdict["previous_model_id"] == shared.base_id
    assert verdict["new"]["text_to_image/mrr"] > verdict["previous"]["text_to_image/mrr"]
    assert run["newest"] == model["id"]
    assert platform.unhandled == []  # dtlpy needed no route the stand-in lacks
    (feature_set,) = platform.model_feature_sets(model["id"])
    stored = {v["entityId"] for v in platform.vectors(feature_set["id"])}
    assert stored == {i["id"] for i in platform.dataset_items(shared.catalogue["id"])}
    (superseded,) = platform.model_feature_sets(shared.base_id)  # the base's vectors stay, clearly named
    assert superseded["name"] == f"clip-tiny-base (superseded by {model['name']})"
    # the catalogue now says which model searches it: the search panel and the new-item trigger read it
    record = platform.dataset(shared.catalogue["id"])["metadata"]["user"]["clip_finetune"]["search"]
    assert (record["model_id"], record["feature_set_id"]) == (model["id"], feature_set["id"])
    subsets = platform.calls_to("POST", r"^/executions/")  # both runs: each fans its subsets out but the first
    assert len(subsets) >= 2 and {c.json["functionName"] for c in subsets} == {"embed_subset"}


def test_a_model_that_is_not_better_leaves_the_newest_model_unchanged(shared: Project) -> None:
    first, second = shared.runs
    assert second["status"] == "success", second["cycle"].get("error")
    assert [n["name"] for n in second["cycle"]["nodes"]] == [
        "Create New Model", "Fine-tune CLIP", "Promote if better", "Embed dataset"]  # no Update Variable
    verdict = shared.platform.model(second["model"])["metadata"]["user"]["clip_finetune"]["promotion"]
    assert not verdict["promoted"] and verdict["previous_model_id"] == first["model"]
    assert second["newest"] == first["model"]
    assert shared.platform.model_feature_sets(second["model"]) == []  # never embedded with the loser
    # "kept": Embed dataset ran with the Newest CLIP model variable (the first run's model, whose vectors exist)
    (embed,) = [e for e in second["cycle"]["executions"].values() for e in e if e["functionName"] == "embed_dataset"]
    assert embed["input"]["model"] == first["model"] == embed["input"]["winner"]
    assert second["vectors_added"] == 0  # nothing new embedded


def test_search_with_the_promoted_model_ranks_the_right_item_first(shared: Project) -> None:
    model = dl.models.get(model_id=shared.runs[0]["model"])
    dataset = dl.datasets.get(dataset_id=shared.catalogue["id"])
    adapter = ClipAdapter(model_entity=model)
    ranked = {c: [i.description for i in search(model, dataset, f"a {c} circle", k=3, adapter=adapter)]
              for c in COLOURS}
    assert {c: top[0] for c, top in ranked.items()} == {c: f"a {c} circle" for c in COLOURS}, ranked


def test_the_search_function_of_the_app_returns_the_ranked_items_and_their_query(shared: Project) -> None:
    """What a user runs from the UI: the app's search_items function, executed on its service."""
    (nodes,) = [s for s in shared.platform.services.values() if s["moduleName"] == "clip_nodes"]
    service = dl.services.get(service_id=nodes["id"])
    execution = service.execute(function_name="search_items", project_id=nodes["projectId"], execution_input={
        "model": {"model_id": shared.runs[0]["model"]}, "dataset": {"dataset_id": shared.catalogue["id"]},
        "text": "a blue circle", "k": 2}).wait()
    assert execution.latest_status["status"] == "success", execution.latest_status
    items, query = execution.output["items"], execution.output["query"]
    assert len(items) == 2 and items[0]["filename"] == "/search/blue-0.png"
    assert query["join"]["on"]["resource"] == "feature_vectors" and "$euclid" in query["join"]["filter"]["value"]
