"""Installable from the Marketplace: the app and its template are public, with the attributes Dataloop's public apps
declare; the clip_nodes functions users execute directly have a declared service (`clip-nodes`) that dtlpy's
Service entity loads; the template's custom nodes and the pipeline nodes name that service; and the release
checks (adapters/clip_finetune/dataloop/release.py) pass on the manifests as shipped and name what they refuse."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import dtlpy as dl
import pytest
from helpers import REPO
from release_support import HUB

from adapters.clip_finetune.dataloop.release import Release, bumped, load_release, validate
from adapters.clip_finetune.errors import ConfigError

MANIFEST = json.loads((REPO / "dataloop.json").read_text())
TEMPLATE = json.loads((REPO / "pipeline_templates" / "clip-finetune-and-embed" / "dataloop.json").read_text())
COMPONENTS = MANIFEST["components"]
SERVICES = {s["name"]: s for s in COMPONENTS["services"]}
# the attribute keys both dataloop-ai-apps/clip-model-adapter and clip-smart-search declare
PUBLIC_APP_ATTRIBUTES = {"Category", "Provider", "License", "NLP", "Media Type"}


def test_the_app_and_its_template_are_public() -> None:
    for manifest in (MANIFEST, TEMPLATE):
        assert dl.Dpk.from_json(_json=copy.deepcopy(manifest)).scope == "public"


def test_the_app_has_the_attributes_public_apps_declare() -> None:
    attributes = dl.Dpk.from_json(_json=copy.deepcopy(MANIFEST)).attributes
    assert PUBLIC_APP_ATTRIBUTES <= set(attributes)
    assert attributes["Category"] == "Model" and {"Image", "Text"} <= set(attributes["Media Type"])


def test_clip_nodes_has_a_declared_service_dtlpy_loads() -> None:
    dpk = dl.Dpk.from_json(_json=copy.deepcopy(MANIFEST))
    assert [s["name"] for s in dpk.components.services] == ["clip-nodes"]
    service = dl.Service.from_json(_json=copy.deepcopy(SERVICES["clip-nodes"]), client_api=dl.client_api)
    assert (service.name, service.module_name) == ("clip-nodes", "clip_nodes")
    assert service.execution_timeout >= 24 * 3600  # embed_dataset of a large dataset runs for hours
    runtime = dl.KubernetesRuntime(**SERVICES["clip-nodes"]["runtime"])
    assert runtime.pod_type in {p.value for p in dl.InstanceCatalog}
    assert runtime.runner_image == HUB + "cpu:python3.11_pytorch2"
    assert runtime.autoscaler.min_replicas == 0  # no idle pod billed while nobody executes
    assert service.package_revision == "latest"


def test_the_service_runs_what_its_compute_config_declares() -> None:
    module = next(m for m in COMPONENTS["modules"] if m["name"] == "clip_nodes")
    config = next(c for c in COMPONENTS["computeConfigs"] if c["name"] == module["computeConfig"])
    assert SERVICES["clip-nodes"]["runtime"] == config["runtime"]
    assert SERVICES["clip-nodes"]["executionTimeout"] == config["executionTimeout"]


def test_every_node_of_this_app_names_the_declared_service() -> None:
    nodes = TEMPLATE["components"]["pipelineTemplates"][0]["nodes"]
    ours = [n["namespace"] for n in nodes if n["namespace"].get("packageName") == MANIFEST["name"]]
    assert ours and {ns["serviceName"] for ns in ours} == {"clip-nodes"}
    assert {ns["moduleName"] for ns in ours} == {SERVICES["clip-nodes"]["moduleName"]}
    for node in COMPONENTS["pipelineNodes"]:
        service, module, function = node["invoke"]["namespace"].split(".")
        assert (service, module) == ("clip-nodes", "clip_nodes") and function


def test_every_runner_image_is_a_public_dataloop_image() -> None:
    images = {r["runtime"]["runnerImage"] for r in [*COMPONENTS["computeConfigs"], *COMPONENTS["services"]]}
    assert images == {HUB + "gpu:python3.11_cuda11.8_pytorch2", HUB + "cpu:python3.11_pytorch2"}


def test_the_shipped_manifests_pass_the_release_checks() -> None:
    release = load_release(REPO)
    validate(release)
    assert validate(bumped(release, "9.9.9", image="ghcr.io/acme/clip-finetune:9.9.9")) is None


@pytest.mark.parametrize(("break_it", "message"), [
    (lambda r: r.app["components"]["services"][0].update(moduleName="nope"),
     "service clip-nodes: moduleName 'nope' is no module"),
    (lambda r: r.app["components"]["modules"][1]["functions"][0]["input"][0].update(type="Modle"),
     "clip_nodes.promote_if_better 'new_model'"),
    (lambda r: r.app["components"]["computeConfigs"][0]["runtime"].pop("runnerImage"),
     "clip-train-gpu: runtime.runnerImage is empty"),
    (lambda r: next(iter(r.templates.values())).update(version="0.0.9"), "version 0.0.9 is not the app's"),
    (lambda r: r.app["components"]["modules"][0].update(computeConfig="gpu-x"),
     "module clip-finetune-module: computeConfig 'gpu-x' is not declared"),
])
def test_the_release_checks_name_what_they_refuse(break_it: Callable[[Release], Any], message: str) -> None:
    release = load_release(REPO)
    broken = Release(copy.deepcopy(release.app), copy.deepcopy(release.templates))
    break_it(broken)
    with pytest.raises(ConfigError, match="not publishable") as refused:
        validate(broken)
    assert message in str(refused.value)
