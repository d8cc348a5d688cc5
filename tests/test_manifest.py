"""The app manifest (dataloop.json) checked against dtlpy, the adapter class and the one configuration model.

`dl.Dpk.from_json` validates almost nothing, so each rule the platform relies on is asserted here.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

import dtlpy as dl
import open_clip
import pytest
from helpers import REPO

from adapters.clip_finetune.config import FinetuneConfig, build_config

MANIFEST: dict[str, Any] = json.loads((REPO / "dataloop.json").read_text())
COMPONENTS = MANIFEST["components"]
MODULES = COMPONENTS["modules"]
MODEL_MODULE, NODES_MODULE = MODULES  # the model adapter (the model is its init input); the pipeline nodes
FUNCTIONS = [(module["name"], fn) for module in MODULES for fn in module["functions"]]
COMPUTE_CONFIGS = {cfg["name"]: cfg for cfg in COMPONENTS["computeConfigs"]}

# Function IO types the platform accepts: the types of dtlpy 1.126's PackageInputType, each also as a list `T[]`.
_BASE_TYPES = (
    "Dataset",
    "Item",
    "Annotation",
    "Execution",
    "Task",
    "Assignment",
    "Service",
    "Package",
    "Project",
    "Recipe",
    "Json",
    "String",
    "Number",
    "Integer",
    "Float",
    "Boolean",
    "Model",
)
ALLOWED_IO_TYPES = {*_BASE_TYPES, *(f"{t}[]" for t in _BASE_TYPES)}

# Each model entity's configuration = FinetuneConfig with these overrides. A new model needs a row here.
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {
    "openclip-vit-b-32": {},
    "openclip-xlm-roberta-base-vit-b-32": {
        "model_name": "xlm-roberta-base-ViT-B-32",
        "pretrained": "laion5b_s13b_b90k",
    },
}


def _io_params(fn: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{fn['name']}.{kind}.{io['name']}", io) for kind in ("input", "output") for io in fn[kind]]


ALL_IO = [pytest.param(io, id=ident) for _, fn in FUNCTIONS for ident, io in _io_params(fn)]


def _entry_point(module: dict[str, Any]) -> Path:
    return REPO / module["entryPoint"]


def _load_class(module: dict[str, Any]) -> type:
    """Load the entry point as a file, the way dtlpy's runner does (so relative imports would fail here too)."""
    spec = importlib.util.spec_from_file_location(module["className"], _entry_point(module))
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return getattr(code, module["className"])


@pytest.fixture(scope="module")
def adapter_cls() -> type:
    """The model module's class."""
    return _load_class(MODEL_MODULE)


@pytest.fixture(scope="module")
def classes() -> dict[str, type]:
    """Each module's class, loaded by path."""
    return {module["name"]: _load_class(module) for module in MODULES}


def test_manifest_loads_with_dtlpy() -> None:
    dpk = dl.Dpk.from_json(_json=json.loads(json.dumps(MANIFEST)))
    assert (dpk.name, dpk.version, dpk.scope) == ("clip-finetune", "0.1.0", "public")
    assert [m.name for m in dpk.components.modules] == ["clip-finetune-module", "clip_nodes"]
    module, nodes = dpk.components.modules
    assert module.entry_point == "adapters/clip_finetune/dataloop/adapter.py"
    assert module.class_name == "ClipAdapter"
    assert [f.name for f in module.functions] == ["train_model", "evaluate_model", "embed_items", "embed_dataset"]
    assert [i.to_json() for i in module.init_inputs] == [{"name": "model_entity", "type": "Model"}]
    assert (nodes.entry_point, nodes.class_name) == ("adapters/clip_finetune/dataloop/nodes.py", "ClipNodes")
    assert [f.name for f in nodes.functions] == ["promote_if_better", "embed_dataset", "embed_subset", "search_items",
                                                 "embed_item", "embed_query", "search_feedback",
                                                 "queries_to_labelling", "labelling_to_pairs"]
    assert nodes.init_inputs == []  # a pipeline node's module: the model is a function input
    assert {m["name"] for m in dpk.components.models} == set(MODEL_OVERRIDES)
    assert [c.name for c in dpk.components.compute_configs] == list(COMPUTE_CONFIGS)


def test_names_are_unique() -> None:
    for kind in ("modules", "models", "computeConfigs"):
        names = [c["name"] for c in COMPONENTS[kind]]
        assert len(names) == len(set(names)), f"duplicate {kind} name in {names}"
    for module in MODULES:
        names = [f["name"] for f in module["functions"]]
        assert len(names) == len(set(names)), f"duplicate function in {module['name']}: {names}"
        for fn in module["functions"]:
            for kind in ("input", "output"):
                io_names = [io["name"] for io in fn[kind]]
                assert len(io_names) == len(set(io_names)), f"{fn['name']}: duplicate {kind} {io_names}"


@pytest.mark.parametrize("io", ALL_IO)
def test_function_io_passes_dtlpy_type_check(io: dict[str, Any]) -> None:
    built = dl.FunctionIO(**io)  # raises PlatformException on an unknown type
    assert built.type in ALLOWED_IO_TYPES
    assert built.name == io["name"] and io["name"].isidentifier()


def test_entry_point_classes() -> None:
    assert issubclass(_load_class(MODEL_MODULE), dl.BaseModelAdapter)
    assert issubclass(_load_class(NODES_MODULE), dl.BaseServiceRunner)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m["name"])
def test_init_inputs_match_the_constructor(classes: dict[str, type], module: dict[str, Any]) -> None:
    names = [io["name"] for io in module["initInputs"]]
    inspect.signature(classes[module["name"]].__init__).bind(None, **dict.fromkeys(names))


def _callable_with(method: Any, declared: list[str]) -> None:
    """Declared inputs are the method's leading parameters, in order, and suffice to call it."""
    params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    assert named[: len(declared)] == declared, f"declared {declared}, method takes {named}"
    inspect.signature(method).bind(None, **dict.fromkeys(declared))  # every other parameter has a default


@pytest.mark.parametrize("module_name,fn", [pytest.param(m, fn, id=f"{m}.{fn['name']}") for m, fn in FUNCTIONS])
def test_functions_exist_with_the_declared_inputs(classes: dict[str, type], module_name: str, fn: dict[str, Any]
                                                  ) -> None:
    cls = classes[module_name]
    method = getattr(cls, fn["name"], None)
    assert callable(method), f"{cls.__name__} has no method {fn['name']!r}"
    _callable_with(method, [io["name"] for io in fn["input"]])
    # dtlpy declares the service functions it implements; the input types must agree with it
    sdk = getattr(getattr(dl.BaseModelAdapter, fn["name"], None), "__dtlpy__", None)
    if sdk is not None and module_name == MODEL_MODULE["name"]:
        assert [(io["name"], io["type"]) for io in fn["input"]] == [(io["name"], io["type"]) for io in sdk["input"]]
    assert fn.get("displayName"), f"{fn['name']} has no displayName"


@pytest.mark.parametrize("model", [pytest.param(m, id=m["name"]) for m in COMPONENTS["models"]])
def test_model_configuration_is_the_config_model(model: dict[str, Any]) -> None:
    configuration = model["configuration"]
    expected = FinetuneConfig(**MODEL_OVERRIDES[model["name"]]).model_dump(mode="json")
    assert configuration == expected
    # round trip: nothing in the manifest is normalised or defaulted on load
    assert build_config(configuration).model_dump(mode="json") == configuration
    arch = open_clip.get_model_config(configuration["model_name"])
    assert configuration["embeddings_size"] == arch["embed_dim"]


@pytest.mark.parametrize("model", [pytest.param(m, id=m["name"]) for m in COMPONENTS["models"]])
def test_model_entity_fields(model: dict[str, Any]) -> None:
    assert model["moduleName"] in {m["name"] for m in MODULES}
    assert (model["scope"], model["status"]) == ("project", "pre-trained")
    assert (model["inputType"], model["outputType"]) == ("image", "embedding")
    assert model["labels"] == [] and model["description"]
    for subset, query in model["metadata"]["system"]["subsets"].items():
        assert subset in ("train", "validation") and query["filter"]["$and"]


def _referenced_compute_configs() -> list[tuple[str, str]]:
    refs = [(m["name"], m["computeConfig"]) for m in MODULES]
    return refs + [(fn["name"], fn["computeConfig"]) for _, fn in FUNCTIONS if "computeConfig" in fn]


@pytest.mark.parametrize("owner,name", _referenced_compute_configs())
def test_referenced_compute_configs_exist(owner: str, name: str) -> None:
    assert name in COMPUTE_CONFIGS, f"{owner} uses computeConfig {name!r}; known: {sorted(COMPUTE_CONFIGS)}"


@pytest.mark.parametrize("node", COMPONENTS["pipelineNodes"], ids=lambda n: n["name"])
def test_pipeline_node_invokes_a_function_of_a_module_without_init_inputs(node: dict[str, Any]) -> None:
    """As active-learning declares "Create New Model": invoke type function, namespace
    <computeConfig>.<module>.<function> of a module that has no initInputs."""
    assert node["invoke"]["type"] == "function" and node["scope"] == "node" and node["displayName"]
    compute, module_name, function = node["invoke"]["namespace"].split(".")
    module = next(m for m in MODULES if m["name"] == module_name)
    assert module["computeConfig"] == compute and module["initInputs"] == []
    assert function in {f["name"] for f in module["functions"]}


def test_every_compute_config_is_used() -> None:
    assert {name for _, name in _referenced_compute_configs()} == set(COMPUTE_CONFIGS)


@pytest.mark.parametrize("cfg", [pytest.param(c, id=n) for n, c in COMPUTE_CONFIGS.items()])
def test_compute_config_values_are_known_to_dtlpy(cfg: dict[str, Any]) -> None:
    built = dl.entities.dpk.DpkComputeConfig.from_json(cfg)
    runtime = built.runtime
    assert runtime["podType"] in {p.value for p in dl.InstanceCatalog}
    assert runtime["autoscaler"]["type"] in {t.value for t in dl.KubernetesAutoscalerType}
    assert 0 <= runtime["autoscaler"]["minReplicas"] <= runtime["autoscaler"]["maxReplicas"]
    assert runtime["concurrency"] >= 1 and runtime["runnerImage"]
    assert isinstance(built.execution_timeout, int) and built.execution_timeout > 0


def _function(name: str) -> dict[str, Any]:
    return next(fn for _, fn in FUNCTIONS if fn["name"] == name)


def test_training_runs_on_one_non_preemptible_gpu_for_days() -> None:
    runtime = COMPUTE_CONFIGS[_function("train_model")["computeConfig"]]
    assert runtime["runtime"]["podType"].startswith("gpu-")
    assert runtime["runtime"]["preemptible"] is False
    assert runtime["runtime"]["autoscaler"]["maxReplicas"] == 1
    assert runtime["executionTimeout"] >= 24 * 3600


def test_dataset_embedding_scales_out_and_runs_long() -> None:
    cfg = COMPUTE_CONFIGS[_function("embed_dataset")["computeConfig"]]
    assert cfg["runtime"]["autoscaler"]["maxReplicas"] > 1
    assert cfg["executionTimeout"] > COMPUTE_CONFIGS[MODULES[0]["computeConfig"]]["executionTimeout"]
    nodes = COMPUTE_CONFIGS[NODES_MODULE["computeConfig"]]["runtime"]
    # the Embed dataset node waits for the subsets it sent to its own service: a replica must have a second slot
    # for them, and a waiting execution must make the autoscaler add replicas
    assert nodes["concurrency"] >= 2 and nodes["autoscaler"]["maxReplicas"] > 1
    assert nodes["autoscaler"]["queueLength"] == 1
