"""The pipeline template (pipeline_templates/clip-finetune-and-embed) checked as a graph and against the app.

The flaws of Dataloop's own "CLIP Fine-tuning" pipeline template each have a test here: embedding must
start by itself after training, the install-time defaults must bind to variables spelled exactly, a promotion
gate compares the new model on a test subset before the newest-model variable is overwritten, every ML node
calls a function model management really offers, and search data is its own variable. tests/test_pipeline_run.py
runs the template on the loopback platform.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any

import dtlpy as dl
import pytest
from helpers import REPO

from adapters.clip_finetune.config import FIELDS, FinetuneConfig, build_config

TEMPLATE_DIR = REPO / "pipeline_templates" / "clip-finetune-and-embed"
DPK: dict[str, Any] = json.loads((TEMPLATE_DIR / "dataloop.json").read_text())
APP: dict[str, Any] = json.loads((REPO / "dataloop.json").read_text())
(TEMPLATE,) = DPK["components"]["pipelineTemplates"]
NODES: dict[str, dict[str, Any]] = {n["id"]: n for n in TEMPLATE["nodes"]}
VARIABLES: dict[str, dict[str, Any]] = {v["name"]: v for v in TEMPLATE["variables"]}
CONNECTIONS: list[dict[str, Any]] = TEMPLATE["connections"]
APP_FUNCTIONS = {fn["name"]: fn for module in APP["components"]["modules"] for fn in module["functions"]}
APP_MODULES = {module["name"]: module for module in APP["components"]["modules"]}
APP_NODES = {n["invoke"]["namespace"]: n for n in APP["components"].get("pipelineNodes", [])}

# ML nodes run through the platform's model-management app, which offers these four functions (every ML node in
# dataloop-ai-apps/pipeline-templates uses one) and calls these service functions of the model's own app.
ML_PACKAGE = "model-mgmt-app"
ML_FUNCTIONS = {
    "train": "train_model",
    "evaluate": "evaluate_model",
    "embed": "embed_items",
    "predict": "predict_items",
}

# Nodes from other apps, with the IO their manifests declare (dataloop-ai-apps/active-learning dataloop.json:
# module create_new_model; pipeline-utils' update_variable names its ports after the variable it sets).
EXTERNAL_FUNCTIONS: dict[tuple[str, str], dict[str, list[tuple[str, str]]] | None] = {
    ("active-learning", "create_new_model"): {
        "inputs": [
            ("base_model", "Model"),
            ("dataset", "Dataset"),
            ("train_subset", "Json"),
            ("validation_subset", "Json"),
            ("model_configuration", "Json"),
        ],
        "outputs": [("new_model", "Model"), ("base_model", "Model")],
    },
    ("pipeline-utils", "update_variable"): None,
}

VAR_PLACEHOLDER = re.compile(r"^\$var\((?P<key>.+)\)$")
EXPECTED_VARIABLES = {
    "Dataset with captions": "Dataset",
    "Dataset to embed": "Dataset",
    "Base CLIP model": "Model",
    "Newest CLIP model": "Model",
    "Model config": "Json",
    "Promotion config": "Json",
}


def _ports(node: dict[str, Any], io: str) -> dict[str, dict[str, Any]]:
    return {p["portId"]: p for p in node["inputs" if io == "input" else "outputs"]}


def _nodes_of(kind: str) -> list[dict[str, Any]]:
    return [n for n in TEMPLATE["nodes"] if n["type"] == kind]


def _edges() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {node_id: [] for node_id in NODES}
    for c in CONNECTIONS:
        out[c["src"]["nodeId"]].append(c["tgt"]["nodeId"])
    return out


def _path(src: str, dst: str) -> list[str] | None:
    """Shortest chain of connections from src to dst (breadth-first), or None."""
    prev: dict[str, str | None] = {src: None}
    queue = deque([src])
    edges = _edges()
    while queue:
        node = queue.popleft()
        if node == dst:
            chain = [node]
            while prev[chain[-1]] is not None:
                chain.append(prev[chain[-1]])  # type: ignore[arg-type]
            return chain[::-1]
        for nxt in edges[node]:
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return None


def test_template_parses_with_dtlpy() -> None:
    dpk = dl.Dpk.from_json(_json=json.loads(json.dumps(DPK)))
    assert dpk.components.pipeline_templates[0]["name"] == TEMPLATE["name"]
    pipeline = dl.Pipeline.from_json(_json=json.loads(json.dumps(TEMPLATE)), client_api=None)
    assert len(pipeline.nodes) == len(NODES) == len(TEMPLATE["nodes"])  # ids are unique
    assert len(pipeline.connections) == len(CONNECTIONS)
    assert {v.name: v.variable_type for v in pipeline.variables} == EXPECTED_VARIABLES


def test_port_ids_are_unique() -> None:
    port_ids = [p["portId"] for n in TEMPLATE["nodes"] for p in n["inputs"] + n["outputs"]]
    assert len(port_ids) == len(set(port_ids))


@pytest.mark.parametrize(
    "conn", CONNECTIONS, ids=lambda c: f"{NODES[c['src']['nodeId']]['name']}->{NODES[c['tgt']['nodeId']]['name']}"
)
def test_connection_joins_an_output_to_an_input_of_the_same_type(conn: dict[str, Any]) -> None:
    src, tgt = NODES[conn["src"]["nodeId"]], NODES[conn["tgt"]["nodeId"]]
    out_port = _ports(src, "output").get(conn["src"]["portId"])
    in_port = _ports(tgt, "input").get(conn["tgt"]["portId"])
    assert out_port is not None, f"{conn['src']['portId']} is not an output of {src['name']!r}"
    assert in_port is not None, f"{conn['tgt']['portId']} is not an input of {tgt['name']!r}"
    assert out_port["type"] == in_port["type"], f"{out_port['name']} -> {in_port['name']}"
    assert "variableName" not in in_port, f"{tgt['name']}.{in_port['name']} is both connected and a variable"
    assert json.loads(conn["condition"]) == {}


@pytest.mark.parametrize("node", TEMPLATE["nodes"], ids=lambda n: n["name"])
def test_every_input_is_fed(node: dict[str, Any]) -> None:
    """Each input port gets a connection, a variable or a default: nothing is left for a person to fill."""
    connected = {c["tgt"]["portId"] for c in CONNECTIONS if c["tgt"]["nodeId"] == node["id"]}
    for port in node["inputs"]:
        fed = port["portId"] in connected or "variableName" in port or "defaultValue" in port
        assert fed, f"{node['name']}.{port['name']} has no connection, variable or default"


def _variable_references() -> list[tuple[str, str, str]]:
    refs = [
        (f"{n['name']}.{p['name']}", p["variableName"], p["type"])
        for n in TEMPLATE["nodes"]
        for p in n["inputs"]
        if "variableName" in p
    ]
    refs += [
        (f"{n['name']}.variableModel", n["metadata"]["variableModel"], "Model")
        for n in TEMPLATE["nodes"]
        if "variableModel" in n["metadata"]
    ]
    refs += [
        (f"{n['name']}.variableDataset", n["metadata"]["variableDataset"], "Dataset")
        for n in TEMPLATE["nodes"]
        if "variableDataset" in n["metadata"]
    ]
    refs += [
        (f"{n['name']}.port", p["name"], p["type"])
        for n in _nodes_of("updateVariable")
        for p in n["inputs"] + n["outputs"]
    ]
    return refs


@pytest.mark.parametrize("where,name,type_", _variable_references())
def test_referenced_variable_exists_with_its_type(where: str, name: str, type_: str) -> None:
    assert name in VARIABLES, f"{where} names variable {name!r}; variables: {sorted(VARIABLES)}"
    assert VARIABLES[name]["type"] == type_, f"{where}: {name!r} is {VARIABLES[name]['type']}, used as {type_}"


def test_every_variable_is_used() -> None:
    assert {name for _, name, _ in _variable_references()} == set(VARIABLES)


@pytest.mark.parametrize("var", TEMPLATE["variables"], ids=lambda v: v["name"])
def test_variable_placeholder_is_spelled_from_its_name(var: dict[str, Any]) -> None:
    dl.FunctionIO(type=var["type"], name="value")  # dtlpy's type check
    if isinstance(var["value"], str):
        match = VAR_PLACEHOLDER.match(var["value"])
        assert match, f"{var['name']}: value {var['value']!r} is not a $var(...) placeholder"
        assert match["key"] == f"{var['name']}__{var['type'].lower()}"


def test_install_defaults_bind_to_variables_exactly() -> None:
    placeholders = {
        VAR_PLACEHOLDER.match(v["value"])["key"]: v for v in TEMPLATE["variables"] if isinstance(v["value"], str)
    }
    assert set(DPK["variables"]) <= set(placeholders), "a default-map key matches no variable placeholder"
    models = {m["name"] for m in APP["components"]["models"]}
    for key, ref in DPK["variables"].items():
        dpk_name, kind, model_name = ref.split(".", 2)
        assert placeholders[key]["type"] == "Model" and kind == "models"
        assert dpk_name == APP["name"] and model_name in models, f"{key}: {ref} is not a model of the app"
    model_vars = {k for k, v in placeholders.items() if v["type"] == "Model"}
    assert model_vars == set(DPK["variables"]), "every model variable needs an install-time default"


def test_model_config_variable_validates_over_the_base_model() -> None:
    overrides = VARIABLES["Model config"]["value"]
    base = next(
        m
        for m in APP["components"]["models"]
        if f"{APP['name']}.models.{m['name']}" == DPK["variables"]["Base CLIP model__model"]
    )
    assert set(overrides) <= set(FIELDS)
    build_config(base["configuration"], overrides)
    defaults = FinetuneConfig().model_dump(mode="json")
    assert overrides == {k: defaults[k] for k in overrides}, "the template shows the defaults of config.py"


@pytest.mark.parametrize("node", _nodes_of("ml"), ids=lambda n: n["name"])
def test_ml_node_calls_a_function_of_this_app(node: dict[str, Any]) -> None:
    namespace = node["namespace"]
    assert namespace["packageName"] == ML_PACKAGE
    fn = APP_FUNCTIONS.get(ML_FUNCTIONS.get(namespace["functionName"], ""))
    assert fn is not None, f"{node['name']}: ML function {namespace['functionName']!r} is not in ./dataloop.json"
    # the model comes from a port or from a model variable; the other ports are the function's inputs
    ports = [(p["name"], p["type"]) for p in node["inputs"]]
    assert ("model", "Model") in ports or "variableModel" in node["metadata"]
    declared = [(io["name"], io["type"]) for io in fn["input"]]
    assert [p for p in ports if p[0] != "model"] == [d for d in declared if d[0] != "model"]
    assert [(p["name"], p["type"]) for p in node["outputs"]] == [(io["name"], io["type"]) for io in fn["output"]]


def _own_nodes() -> list[dict[str, Any]]:
    return [n for n in _nodes_of("custom") if n["namespace"]["packageName"] == APP["name"]]


@pytest.mark.parametrize("node", _own_nodes(), ids=lambda n: n["name"])
def test_own_custom_node_is_a_declared_pipeline_node_of_a_module_without_init_inputs(node: dict[str, Any]) -> None:
    """As active-learning serves Create New Model: a pipelineNodes component invoking a function of a module that
    takes the model as a function input (no initInputs), with the node's ports exactly the function's IO."""
    ns = node["namespace"]
    module = APP_MODULES[ns["moduleName"]]
    assert module["initInputs"] == []
    fn = next(f for f in module["functions"] if f["name"] == ns["functionName"])
    invoke = f"{module['computeConfig']}.{module['name']}.{fn['name']}"
    assert invoke in APP_NODES, f"no pipelineNodes entry invokes {invoke}"
    assert node["metadata"]["pipelineNodeName"] == APP_NODES[invoke]["name"] and node["dpkName"] == APP["name"]
    assert [(p["name"], p["type"]) for p in node["inputs"]] == [(io["name"], io["type"]) for io in fn["input"]]
    assert [(p["name"], p["type"], p.get("actions")) for p in node["outputs"]] == [
        (io["name"], io["type"], io.get("actions")) for io in fn["output"]]


@pytest.mark.parametrize("node", [n for n in TEMPLATE["nodes"] if n["type"] != "ml" and n not in _own_nodes()],
                         ids=lambda n: n["name"])
def test_other_nodes_are_documented_external_functions(node: dict[str, Any]) -> None:
    key = (node["namespace"]["packageName"], node["namespace"]["functionName"])
    assert key in EXTERNAL_FUNCTIONS, f"{node['name']}: {key} is neither this app's nor a documented node"
    spec = EXTERNAL_FUNCTIONS[key]
    if spec is not None:
        assert [(p["name"], p["type"]) for p in node["inputs"]] == spec["inputs"]
        assert [(p["name"], p["type"]) for p in node["outputs"]] == spec["outputs"]
    if "dpkName" in node:
        assert node["dpkName"] == key[0]


def test_connections_from_a_port_with_actions_name_one() -> None:
    for conn in CONNECTIONS:
        port = _ports(NODES[conn["src"]["nodeId"]], "output")[conn["src"]["portId"]]
        assert conn.get("action") in (port.get("actions") or [None]), (port["name"], conn.get("action"))


def test_template_depends_on_the_apps_it_uses() -> None:
    needed = {APP["name"]} | {n["dpkName"] for n in TEMPLATE["nodes"] if "dpkName" in n}
    assert {d["name"] for d in DPK["dependencies"]} == needed


def test_single_root_start_node() -> None:
    (start,) = TEMPLATE["startNodes"]
    assert start["type"] == "root" and start["nodeId"] in NODES
    # dtlpy refuses connections into a start node (Pipeline.set_start_node)
    assert all(c["tgt"]["nodeId"] != start["nodeId"] for c in CONNECTIONS)


def test_every_node_runs_from_the_start_node() -> None:
    start = TEMPLATE["startNodes"][0]["nodeId"]
    unreachable = [NODES[n]["name"] for n in NODES if _path(start, n) is None]
    assert not unreachable, f"nodes that would need a manual trigger: {unreachable}"


def test_train_promote_update_embed_chain_needs_no_manual_trigger() -> None:
    start = TEMPLATE["startNodes"][0]["nodeId"]
    (embed,) = [n for n in TEMPLATE["nodes"] if n["namespace"]["functionName"] == "embed_dataset"]
    chain = _path(start, embed["id"])
    assert chain is not None, "the embedding node is not connected to the start node"
    steps = [(NODES[n]["type"], NODES[n]["namespace"]["functionName"]) for n in chain]
    assert steps == [
        ("custom", "create_new_model"),
        ("ml", "train"),
        ("custom", "promote_if_better"),
        ("custom", "embed_dataset"),  # "kept": the current model embeds (new items get their vectors)
    ]
    (update,) = _nodes_of("updateVariable")
    promote = NODES[chain[2]]
    routes = sorted((c.get("action"), NODES[c["tgt"]["nodeId"]]["name"]) for c in CONNECTIONS
                    if c["src"]["nodeId"] == promote["id"])
    assert routes == [("kept", "Embed dataset"), ("promoted", "Embed dataset"), ("promoted", "Update Variable")]
    # Update Variable runs first (listed first); nothing reads its output port, whose behaviour no Dataloop
    # template shows: the embed node reads the variable itself, as Dataloop's CLIP template's embed node does
    assert [c["tgt"]["nodeId"] for c in CONNECTIONS if c["src"]["nodeId"] == promote["id"]][0] == update["id"]
    assert not [c for c in CONNECTIONS if c["src"]["nodeId"] == update["id"]]
    assert update["outputs"][0]["name"] == "Newest CLIP model"
    ports = {p["name"]: p for p in embed["inputs"]}
    assert ports["model"]["variableName"] == "Newest CLIP model"
    assert {c["tgt"]["portId"] for c in CONNECTIONS if c["tgt"]["nodeId"] == embed["id"]} == {ports["winner"]["portId"]}
    dataset_port = next(p for p in embed["inputs"] if p["type"] == "Dataset")
    assert dataset_port["variableName"] == "Dataset to embed"


def test_the_gate_compares_against_the_newest_model_on_the_test_subset() -> None:
    (promote,) = [n for n in TEMPLATE["nodes"] if n["namespace"]["functionName"] == "promote_if_better"]
    ports = {p["name"]: p for p in promote["inputs"]}
    assert ports["previous_model"]["variableName"] == "Newest CLIP model"
    assert ports["dataset"]["variableName"] == "Dataset with captions"
    clauses = ports["filters"]["defaultValue"]["filter"]["$and"]
    assert {"metadata.system.tags.test": True} in clauses  # neither the train nor the validation subset
    assert set(VARIABLES["Promotion config"]["value"]) == {"metric", "margin"}


def test_readme_documents_the_variables_and_shows_the_diagram() -> None:
    readme = (TEMPLATE_DIR / "README.md").read_text()
    for name in VARIABLES:
        assert f"| {name} |" in readme, f"README variables table lacks {name!r}"
    assert "../../assets/pipeline.png" in readme
    assert (TEMPLATE_DIR / "../../assets/pipeline.png").resolve().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TEMPLATE["name"] in readme
    assert "active_learning" in readme  # cites the template whose pattern it follows
