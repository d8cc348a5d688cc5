"""Installed apps (DPKs) and their services: what the stand-in needs to run an app's functions in process.

`install_app(project_id, manifest, root)` registers an app manifest (dataloop.json) the way installing it does:
its package, a model entity per `components.models` entry (packageId and moduleName pointing back at it), a
service per `components.services` entry, its triggers (triggers.py), and a service per module when a function of
it is first called. A function runs in this process: the module's
entryPoint is loaded from `root` by path (as dtlpy's runner loads it), its class is built with the module's
initInputs, and the function gets its declared inputs as dtlpy entities, plus `progress` and `context` when it
takes them, as the platform's agent passes them.

Apps the stand-in cannot run from a checkout (Dataloop's marketplace apps) register Python callables instead
(`install_marketplace_app`, marketplace.py).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import JSON, TEST_USER_EMAIL, _now, new_id

ENTITY_TYPES = {"Model": "model", "Dataset": "dataset", "Item": "item", "Project": "project"}


@dataclass
class App:
    """An installed app: its manifest, where its code is, and the runners of its services (one per service)."""

    id: str
    project_id: str
    manifest: JSON
    root: Path | None = None
    callables: dict[tuple[str, str], Callable[..., Any]] = field(default_factory=dict)  # marketplace apps
    runners: dict[str, Any] = field(default_factory=dict)  # service id -> module instance (one replica)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def module(self, name: str) -> JSON | None:
        return next((m for m in self.manifest["components"].get("modules", []) if m["name"] == name), None)

    def function(self, module_name: str, function_name: str) -> JSON | None:
        module = self.module(module_name) or {}
        return next((f for f in module.get("functions", []) if f["name"] == function_name), None)


class Progress:
    """dl.Progress as the agent hands it to a function: what it reports is kept on the execution."""

    def __init__(self, execution: JSON) -> None:
        self.execution = execution

    def update(self, status: Any = None, progress: int = 0, message: Any = None, output: Any = None,
               duration: Any = None, action: str | None = None) -> None:
        status_json = self.execution["latestStatus"]
        status_json["percentComplete"] = progress or status_json.get("percentComplete", 0)
        if message is not None:
            status_json["message"] = str(message)
        if action is not None:
            self.execution["action"] = action


class Apps:
    """Mixed into LoopbackPlatform (server.py): installed apps, their services, and running their functions."""

    def install_app(self, project_id: str, manifest: JSON, root: Path | None = None) -> App:
        """Install an app manifest in a project: its package and model entities (returned in `app.models`)."""
        with self._lock:
            app = App(new_id(), project_id, copy.deepcopy(manifest), root)
            self.apps[app.id] = app
            self.packages[app.id] = {"id": app.id, "name": app.name, "projectId": project_id, "type": "faas",
                                     "modules": copy.deepcopy(manifest["components"].get("modules", [])),
                                     "creator": TEST_USER_EMAIL, "createdAt": _now(),
                                     "url": f"{self.base_url}/packages/{app.id}"}
            for model in manifest["components"].get("models", []):
                created = self.add_model(project_id, model["name"], model.get("configuration"), status=model.get(
                    "status", "pre-trained"), input_type=model.get("inputType", "image"), output_type=model.get(
                    "outputType", "embedding"), package_id=app.id, module_name=model["moduleName"])
                self.models[created["id"]]["metadata"] = copy.deepcopy(model.get("metadata") or {"system": {}})
        for service in manifest["components"].get("services", []):  # installing an app deploys its services
            self.service_for(app, service["moduleName"], service["name"])
        self.register_triggers(app)  # triggers.py
        return app

    def app_named(self, project_id: str, name: str) -> App | None:
        return next((a for a in self.apps.values() if a.name == name and a.project_id == project_id), None)

    def app_models(self, app: App) -> dict[str, str]:
        """{model name: model id} of the models the app's install created."""
        return {m["name"]: m["id"] for m in self.models.values() if m["packageId"] == app.id}

    def service_for(self, app: App, module_name: str, service_name: str) -> JSON:
        """The service running `module_name` of `app`, created on first use (the platform creates a pipeline
        node's service when the pipeline needs it)."""
        with self._lock:
            for service in self.services.values():
                if service["packageId"] == app.id and service["name"] == service_name:
                    return service
            sid = new_id()
            self.services[sid] = {
                "id": sid, "name": service_name, "packageId": app.id, "packageName": app.name,
                "moduleName": module_name, "projectId": app.project_id, "creator": TEST_USER_EMAIL,
                "createdAt": _now(), "updatedAt": _now(), "url": f"{self.base_url}/services/{sid}",
                "runtime": {}, "initParams": {}, "versions": {}, "active": True,
            }
            return self.services[sid]

    # ---------------------------------------------------------------- running a function
    def run_function(self, service: JSON, function_name: str, inputs: JSON, execution: JSON,
                     init: JSON | None = None, pipeline: JSON | None = None) -> Any:
        """Call `function_name` of the service's module in this process with `inputs` ({input name: value}); its
        return value. `init`: the module's initInputs (a model service's model)."""
        import dtlpy as dl

        app = self.apps[service["packageId"]]
        spec = app.function(service["moduleName"], function_name) or {}
        kwargs = {io["name"]: to_entity(io["type"], inputs.get(io["name"])) for io in spec.get("input", [])
                  if io["name"] in inputs}
        fn = app.callables.get((service["moduleName"], function_name))
        if fn is None:
            fn = getattr(self._runner(app, service, init), function_name)
        params = inspect.signature(fn).parameters
        progress = Progress(execution)
        if "progress" in params:
            kwargs["progress"] = progress
        if "context" in params:
            kwargs["context"] = dl.Context(service=dl.Service.from_json(_json=copy.deepcopy(service),
                                                                         client_api=dl.client_api),
                                           execution_dict=_execution_dict(execution, pipeline), progress=progress)
        return fn(**kwargs)

    def _runner(self, app: App, service: JSON, init: JSON | None) -> Any:
        """The module's class built once per service (one replica), as the agent builds it at start."""
        key = service["id"] if not init else f"{service['id']}:{sorted(init.items())}"
        with self._runner_lock:
            if key not in app.runners:
                module = app.module(service["moduleName"])
                cls = _load_class(app.root / module["entryPoint"], module["className"])
                init_kwargs = {io["name"]: to_entity(io["type"], (init or {}).get(io["name"]))
                               for io in module.get("initInputs", [])}
                app.runners[key] = cls(**init_kwargs)
            return app.runners[key]


def _load_class(path: Path, class_name: str) -> type:
    """Load an entryPoint file by path, without registering it in sys.modules, as dtlpy's runner does."""
    spec = importlib.util.spec_from_file_location(class_name, path)
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return getattr(code, class_name)


def entity_id(value: Any) -> Any:
    """An entity input as the platform accepts it: an id, or {"<entity>_id": id}."""
    if isinstance(value, dict):
        ids = [v for k, v in value.items() if k.endswith("_id") and k != "dataset_id"] or [value.get("dataset_id")]
        return ids[0]
    return getattr(value, "id", value)


def to_entity(io_type: str, value: Any) -> Any:
    """A function input as the agent hands it over: dtlpy entities for entity types, JSON as is."""
    import dtlpy as dl

    if io_type.endswith("[]") and isinstance(value, list):
        return [to_entity(io_type[:-2], v) for v in value]
    if value is None or io_type not in ENTITY_TYPES:
        return copy.deepcopy(value)
    ident = entity_id(value)
    getters: dict[str, Callable[[str], Any]] = {
        "Model": lambda i: dl.models.get(model_id=i), "Dataset": lambda i: dl.datasets.get(dataset_id=i),
        "Item": lambda i: dl.items.get(item_id=i), "Project": lambda i: dl.projects.get(project_id=i)}
    return getters[io_type](ident)


def to_json_value(value: Any) -> Any:
    """A function's output as the platform stores it: entities by id, JSON as is."""
    if hasattr(value, "id") and hasattr(value, "to_json"):
        return value.id
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    return copy.deepcopy(value)


def _execution_dict(execution: JSON, pipeline: JSON | None) -> JSON:
    out = {"id": execution["id"]}
    if pipeline is not None:
        out["pipeline"] = {"id": pipeline["id"], "nodeId": pipeline["nodeId"], "executionId": pipeline["executionId"]}
    return out

