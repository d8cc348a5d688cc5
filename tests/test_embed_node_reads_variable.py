"""The template's Embed dataset node (ClipNodes.embed_dataset) embeds the model its `model` input names (the
Newest CLIP model variable) and records it as the dataset's search model; the gate's `winner` only starts it,
except when the winner was promoted over that model (the platform ran the node before Update Variable): then the
winner is embedded, so a promoted model never lacks its vectors. Run through dtlpy on the app's clip-nodes service.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, REPO, image_bytes
from loopback_platform import JSON, LoopbackPlatform

from adapters.clip_finetune.data.synthetic import SyntheticSample, render

pytestmark = pytest.mark.usefixtures("one_torch_thread")

APP = json.loads((REPO / "dataloop.json").read_text())


@dataclass
class Nodes:
    platform: LoopbackPlatform
    project_id: str
    dataset: JSON
    service: dl.Service
    models: list[str]


@pytest.fixture
def nodes(platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Nodes]:
    monkeypatch.chdir(tmp_path)
    pid = platform.add_project()["id"]
    dataset = platform.add_dataset(pid, "catalogue")
    for colour in ("red", "blue"):
        attributes = {"colour": colour, "shape": "circle", "size": "large", "position": "centre",
                      "background": "white"}
        platform.add_item(dataset["id"], image_bytes(render(SyntheticSample(attributes, colour, (colour,), 1))),
                          f"/{colour}.png")
    app = platform.install_app(pid, APP, REPO)
    models = [platform.add_model(pid, name, QUICK_CONFIG, dataset["id"], package_id=app.id,
                                 module_name="clip-finetune-module")["id"] for name in ("newest", "challenger")]
    (service,) = [s for s in platform.services.values() if s["name"] == "clip-nodes"]  # declared: deployed
    yield Nodes(platform, pid, dataset, dl.services.get(service_id=service["id"]), models)


def _embed(n: Nodes, model_id: str, winner_id: str) -> dl.Execution:
    execution = n.service.execute(function_name="embed_dataset", project_id=n.project_id, execution_input={
        "model": {"model_id": model_id}, "dataset": {"dataset_id": n.dataset["id"]},
        "winner": {"model_id": winner_id}}).wait()
    assert execution.latest_status["status"] == "success", execution.latest_status
    return execution


def _search_model(n: Nodes) -> str:
    return n.platform.dataset(n.dataset["id"])["metadata"]["user"]["clip_finetune"]["search"]["model_id"]


def test_kept_embeds_nothing_new(nodes: Nodes) -> None:
    newest, _ = nodes.models
    _embed(nodes, newest, newest)
    vectors = len(nodes.platform.feature_vectors)
    assert vectors == 2 and _search_model(nodes) == newest
    _embed(nodes, newest, newest)  # "kept": the variable is the model that already embedded the dataset
    assert len(nodes.platform.feature_vectors) == vectors


def test_a_winner_promoted_over_the_variables_model_is_embedded(nodes: Nodes) -> None:
    newest, challenger = nodes.models
    model = dl.models.get(model_id=challenger)
    model.metadata.setdefault("user", {})["clip_finetune"] = {"promotion": {"promoted": True,
                                                                            "previous_model_id": newest}}
    model.update()
    _embed(nodes, newest, challenger)  # the variable not updated yet
    assert _search_model(nodes) == challenger
    (feature_set,) = nodes.platform.model_feature_sets(challenger)
    assert len(nodes.platform.vectors(feature_set["id"])) == 2
    assert nodes.platform.model_feature_sets(newest) == []


def test_a_winner_that_was_not_promoted_over_it_only_starts_the_node(nodes: Nodes) -> None:
    newest, challenger = nodes.models
    _embed(nodes, newest, challenger)  # a winner with no promotion record: the variable's model is embedded
    assert _search_model(nodes) == newest
    assert nodes.platform.model_feature_sets(challenger) == []
