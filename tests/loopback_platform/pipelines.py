"""Pipelines: created from a template, updated, installed and executed through the real dtlpy client.

What the stand-in does, read off dtlpy 1.126 (repositories/pipelines.py, pipeline_executions.py, entities/node.py)
and Dataloop's published templates (dataloop-ai-apps/pipeline-templates, active-learning); docs/dataloop.md
lists what could not be verified there:
- `install_template` is "Use Template": every `$var(<key>)` variable value becomes the install-time default the
  template DPK's `variables` map gives (`<app>.models.<model name>`: that model of the installed app), else empty.
- install and execute check the graph: a root start node; `ml` nodes call one of the four functions model
  management offers (train, evaluate, predict, embed); a `custom` node's namespace names an installed app, a
  module of it, a function that module declares, and a `pipelineNodes` component invoking that function;
  `updateVariable` ports name variables. Anything else is refused (400) naming the node.
- execute() answers at once (status "pending") and runs the cycle on a background thread: the start node gets
  the execution input, then each output travels its connections (those whose `action` is the action the
  function reported with progress.update(action=...), or none) and runs the target node once per arrival. An
  input port takes, in order: the value that arrived on it, its variable's value at the time the node runs, its
  default; an unfed port is left out (the function's own default applies). ml nodes run the model's own app
  (train_model, evaluate_model, predict_items, embed_items) with the model from the `model` port or the node's
  `variableModel`; custom nodes run the app's function in process (apps.py); updateVariable sets the variable.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import deque
from typing import Any

from .apps import entity_id, to_json_value
from .common import JSON, _now, new_id
from .dql import dql_match, dql_page, dql_sort
from .executions import ML_FUNCTIONS
from .wire import Call, _HttpError

VAR = re.compile(r"^\$var\((?P<key>.+)\)$")
RUNNABLE = ("ml", "custom", "updateVariable")
# outputs of model management's functions, in the order of the ml node's output ports
ML_OUTPUTS = {"train": lambda out: [out], "evaluate": lambda out: list(out), "predict": lambda out: [
    out[0][0], out[1][0] if out[1] else []], "embed": lambda out: [out[0][0], out[1][0] if out[1] else None]}


class NodeFailed(Exception):
    """A node of a running cycle failed: the cycle fails with this message."""


class Pipelines:
    """Mixed into LoopbackPlatform (server.py)."""

    def _pipeline_routes(self) -> list[tuple[str, str, Any]]:
        oid = r"([0-9a-zA-Z_-]+)"
        return [
            ("POST", r"/pipelines/query", self._query_pipelines),
            ("GET", rf"/pipelines/{oid}", lambda c, pid: self.pipelines[pid]),
            ("PATCH", rf"/pipelines/{oid}/variables", self._patch_variables),
            ("PATCH", rf"/pipelines/{oid}", self._patch_pipeline),
            ("POST", rf"/pipelines/{oid}/install", self._install_pipeline),
            ("POST", rf"/pipelines/{oid}/execute", self._execute_pipeline),
            ("GET", rf"/pipelines/{oid}/executions/{oid}",
             lambda c, pid, eid: copy.deepcopy(self.pipeline_executions[eid])),
        ]

    # ---------------------------------------------------------------- templates
    def install_template(self, project_id: str, dpk: JSON) -> JSON:
        """A pipeline from a template DPK, as "Use Template" creates it: install-time defaults resolved."""
        missing = [d["name"] for d in dpk.get("dependencies", []) if self.app_named(project_id, d["name"]) is None]
        if missing:
            raise ValueError(f"template {dpk['name']!r} depends on apps not installed: {missing}")
        template = copy.deepcopy(dpk["components"]["pipelineTemplates"][0])
        for variable in template.get("variables", []):
            match = VAR.match(str(variable.get("value")))
            if match:
                variable["value"] = self._install_default(project_id, dpk.get("variables", {}).get(match["key"]))
        created = self.add_pipeline(project_id, template["name"], template["nodes"], template["connections"],
                                    template.get("variables"))
        with self._lock:
            self.pipelines[created["id"]].update(startNodes=template.get("startNodes", []), status="Created")
            return copy.deepcopy(self.pipelines[created["id"]])

    def _install_default(self, project_id: str, ref: str | None) -> str | None:
        app_name, kind, name = (ref or "..").split(".", 2)
        app = self.app_named(project_id, app_name)
        return self.app_models(app).get(name) if app is not None and kind == "models" else None

    # ---------------------------------------------------------------- routes
    def _query_pipelines(self, call: Call) -> JSON:
        query = call.json or {}
        docs = [copy.deepcopy(p) for p in self.pipelines.values() if dql_match(p, query.get("filter"))]
        return dql_page(dql_sort(docs, query.get("sort")), query)

    def _patch_variables(self, call: Call, pipeline_id: str) -> JSON:
        self.pipelines[pipeline_id]["variables"] = copy.deepcopy((call.json or {}).get("variables", []))
        return self.pipelines[pipeline_id]

    def _patch_pipeline(self, call: Call, pipeline_id: str) -> JSON:
        stored, body = self.pipelines[pipeline_id], copy.deepcopy(call.json or {})
        for key in ("id", "createdAt", "url", "creator", "projectId", "status"):
            body.pop(key, None)
        stored.update({k: v for k, v in body.items() if v is not None}, updatedAt=_now())
        return stored

    def _install_pipeline(self, call: Call, pipeline_id: str) -> JSON:
        self._check_graph(self.pipelines[pipeline_id])
        self.pipelines[pipeline_id]["status"] = "Installed"
        return self.pipelines[pipeline_id]

    def _execute_pipeline(self, call: Call, pipeline_id: str) -> JSON:
        pipeline = self.pipelines[pipeline_id]
        start = self._check_graph(pipeline)
        options = (call.json or {}).get("pipeline") or {}
        eid = new_id()
        self.pipeline_executions[eid] = {
            "id": eid, "pipelineId": pipeline_id, "pipeline": {"id": pipeline_id, "name": pipeline["name"]},
            "status": "pending", "input": copy.deepcopy(options.get("input") or {}), "nodes": [], "executions": {},
            "creator": pipeline["creator"], "createdAt": _now(), "updatedAt": _now(), "maxAttempts": 1,
            "url": f"{self.base_url}/pipelines/{pipeline_id}/executions/{eid}",
        }
        threading.Thread(target=self._run_cycle, args=(pipeline_id, eid, options.get("nodeId") or start),
                         daemon=True, name=f"pipeline-{eid}").start()
        return copy.deepcopy(self.pipeline_executions[eid])

    # ---------------------------------------------------------------- the graph
    def _check_graph(self, pipeline: JSON) -> str:
        """The root start node's id; 400 naming the first node the platform could not run."""
        roots = [s["nodeId"] for s in pipeline.get("startNodes") or [] if s.get("type") == "root"]
        nodes = {n["id"]: n for n in pipeline["nodes"]}
        if len(roots) != 1 or roots[0] not in nodes:
            raise _HttpError(400, f"pipeline {pipeline['name']!r} has no root start node")
        variables = {v["name"] for v in pipeline.get("variables") or []}
        for node in pipeline["nodes"]:
            problem = self._node_problem(pipeline["projectId"], node, variables)
            if problem:
                raise _HttpError(400, f"pipeline {pipeline['name']!r}, node {node['name']!r}: {problem}")
        return roots[0]

    def _node_problem(self, project_id: str, node: JSON, variables: set[str]) -> str | None:
        ns = node.get("namespace") or {}
        if node["type"] not in RUNNABLE:
            return f"node type {node['type']!r} is not run by the loopback platform"
        if node["type"] == "ml":
            if ns.get("functionName") not in ML_FUNCTIONS:
                return (f"model management has no function {ns.get('functionName')!r} (it offers "
                        f"{', '.join(ML_FUNCTIONS)})")
            return None
        if node["type"] == "updateVariable":
            unknown = [p["name"] for p in node["inputs"] + node["outputs"] if p["name"] not in variables]
            return f"updates variables that do not exist: {unknown}" if unknown else None
        return self._custom_problem(project_id, ns, node)

    def _custom_problem(self, project_id: str, ns: JSON, node: JSON) -> str | None:
        app = self.app_named(project_id, ns.get("packageName", ""))
        if app is None:
            return f"app {ns.get('packageName')!r} is not installed in the project"
        spec = app.function(ns.get("moduleName", ""), ns.get("functionName", ""))
        if spec is None:
            return f"app {app.name!r} declares no function {ns.get('moduleName')}.{ns.get('functionName')}"
        invoked = {n["invoke"]["namespace"].split(".", 1)[-1] for n in app.manifest["components"].get(
            "pipelineNodes", [])}
        if f"{ns['moduleName']}.{ns['functionName']}" not in invoked:
            return f"app {app.name!r} declares no pipeline node invoking {ns['moduleName']}.{ns['functionName']}"
        declared = {io["name"] for io in spec.get("input", [])}
        unknown = [p["name"] for p in node["inputs"] if p["name"] not in declared]
        return f"inputs {unknown} are not inputs of {ns['functionName']}" if unknown else None

    # ---------------------------------------------------------------- a cycle
    def _run_cycle(self, pipeline_id: str, eid: str, start: str) -> None:
        cycle = self.pipeline_executions[eid]
        cycle["status"] = "in-progress"
        pending = deque([(start, copy.deepcopy(cycle["input"]))])
        try:
            while pending:
                node_id, delivered = pending.popleft()
                pipeline = self.pipelines[pipeline_id]
                node = next(n for n in pipeline["nodes"] if n["id"] == node_id)
                for port, value, action in self._run_node(pipeline, cycle, node, delivered):
                    pending.extend(self._targets(pipeline, node, port, value, action))
        except NodeFailed as e:
            cycle.update(status="failed", error=str(e), updatedAt=_now())
            return
        cycle.update(status="success", updatedAt=_now())

    def _targets(self, pipeline: JSON, node: JSON, port: JSON, value: Any, action: str | None) -> list:
        out = []
        for conn in pipeline["connections"]:
            if conn["src"]["nodeId"] != node["id"] or conn["src"]["portId"] != port["portId"]:
                continue
            if conn.get("action") != action:
                continue
            if json.loads(conn.get("condition") or "{}"):
                raise NodeFailed(f"connection from {node['name']!r}: conditions are not run by the loopback platform")
            target = next(n for n in pipeline["nodes"] if n["id"] == conn["tgt"]["nodeId"])
            in_port = next(p for p in target["inputs"] if p["portId"] == conn["tgt"]["portId"])
            out.append((target["id"], {in_port["name"]: value}))
        return out

    def _run_node(self, pipeline: JSON, cycle: JSON, node: JSON, delivered: JSON) -> list:
        values = self._node_inputs(pipeline, node, delivered)
        record = {"id": node["id"], "name": node["name"], "type": node["type"], "namespace": node.get("namespace"),
                  "status": "in-progress", "ports": [], "metadata": {}, "projectId": pipeline["projectId"]}
        cycle["nodes"].append(record)
        ctx = {"id": pipeline["id"], "nodeId": node["id"], "executionId": cycle["id"]}
        if node["type"] == "updateVariable":
            outputs, action = self._update_variables(pipeline, node, values), None
        elif node["type"] == "ml":
            outputs, action = self._run_ml(pipeline, node, values, cycle, ctx)
        else:
            outputs, action = self._run_custom(pipeline, node, values, cycle, ctx)
        record["status"] = "success"
        return [(port, value, action) for port, value in zip(node["outputs"], outputs, strict=False)]

    def _node_inputs(self, pipeline: JSON, node: JSON, delivered: JSON) -> JSON:
        variables = {v["name"]: v.get("value") for v in pipeline.get("variables") or []}
        values = {}
        for port in node["inputs"]:
            if port["name"] in delivered:
                values[port["name"]] = delivered[port["name"]]
            elif port.get("variableName"):
                if variables.get(port["variableName"]) is None:
                    raise NodeFailed(f"node {node['name']!r}: variable {port['variableName']!r} has no value")
                values[port["name"]] = variables[port["variableName"]]
            elif "defaultValue" in port:
                values[port["name"]] = port["defaultValue"]
        return values

    def _update_variables(self, pipeline: JSON, node: JSON, values: JSON) -> list:
        for variable in pipeline["variables"]:
            if variable["name"] in values:
                variable["value"] = entity_id(values[variable["name"]]) if variable["type"] in (
                    "Model", "Dataset", "Item") else values[variable["name"]]
        return [values.get(p["name"]) for p in node["outputs"]]

    def _run_ml(self, pipeline: JSON, node: JSON, values: JSON, cycle: JSON, ctx: JSON) -> tuple[list, None]:
        kind = node["namespace"]["functionName"]
        model_ref = values.get("model")
        variable = node.get("metadata", {}).get("variableModel")
        if model_ref is None and variable:
            model_ref = {v["name"]: v.get("value") for v in pipeline["variables"]}.get(variable)
        model = self.models.get(entity_id(model_ref)) if model_ref is not None else None
        if model is None:
            raise NodeFailed(f"node {node['name']!r}: no model (a `model` port or the node's variableModel)")
        service, function = self.model_service(model), ML_FUNCTIONS[kind]
        if self.apps[model["packageId"]].function(model["moduleName"], function) is None:
            raise NodeFailed(f"node {node['name']!r}: the app of model {model['name']!r} serves no {function!r}")
        inputs = {"model": model["id"], **{k: v for k, v in values.items() if k in ("dataset", "filters")}}
        if kind in ("predict", "embed"):
            inputs = {"items": [entity_id(values["item"])]}
        output = self._node_execution(service, function, inputs, cycle, ctx, node, init={"model_entity": model["id"]})
        return ML_OUTPUTS[kind](output), None

    def _run_custom(self, pipeline: JSON, node: JSON, values: JSON, cycle: JSON, ctx: JSON) -> tuple[list, Any]:
        ns = node["namespace"]
        app = self.app_named(pipeline["projectId"], ns["packageName"])
        service = self.service_for(app, ns["moduleName"], ns.get("serviceName") or f"{ns['moduleName']}-nodes")
        execution_box: list[JSON] = []
        output = self._node_execution(service, ns["functionName"], values, cycle, ctx, node, box=execution_box)
        outputs = list(output) if isinstance(output, tuple) else [output]
        return outputs, execution_box[0].get("action")

    def _node_execution(self, service: JSON, function: str, inputs: JSON, cycle: JSON, ctx: JSON, node: JSON,
                        init: JSON | None = None, box: list | None = None) -> Any:
        execution = self._new_execution(service, function, {k: to_json_value(v) for k, v in inputs.items()}, ctx)
        cycle["executions"].setdefault(node["id"], []).append(execution)
        if box is not None:
            box.append(execution)
        output = self.execute_now(execution, service, init)
        if execution["latestStatus"]["status"] != "success":
            raise NodeFailed(f"node {node['name']!r} ({function}): {execution['latestStatus'].get('message')}")
        return output
