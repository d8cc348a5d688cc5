"""Event triggers of installed apps (dataloop.json `components.triggers`), fired as the platform fires them.

What the stand-in does, read off Dataloop's clip-smart-search app (its `extract-clip-on-item` trigger) and dtlpy
1.126 (entities/trigger.py: TriggerResource, TriggerAction, TriggerExecutionMode; the `namespace`
`services.<service name>`): installing an app registers its triggers in the project; when an item is created in
one of the project's datasets (an upload that creates it, not one that overwrites or skips), every active
`Event` trigger on resource `Item` with action `Created` whose `spec.filter` (DQL, matched against the item as
served) selects the item starts an execution of `spec.operation.functionName` on the trigger's service, the item
as the function's Item input ({"item_id", "dataset_id"}), on a background thread as a replica would. The
execution records the trigger's id (`triggerId`). Items seeded from Python (`add_item`) are data that existed
before: they fire nothing. Executions are listed in `server.trigger_executions`.
"""

from __future__ import annotations

import copy
from typing import Any

from .common import JSON, _now, new_id
from .dql import dql_match
from .wire import Call, _HttpError


class Triggers:
    """Mixed into LoopbackPlatform (server.py)."""

    def _trigger_routes(self) -> list[tuple[str, str, Any]]:
        oid = r"([0-9a-zA-Z_-]+)"
        return [("PATCH", rf"/datasets/{oid}", self._patch_dataset)]

    def register_triggers(self, app: Any) -> list[JSON]:
        """The app's components.triggers as installed triggers of its project (install_app calls this)."""
        created = []
        for spec in app.manifest["components"].get("triggers", []):
            kind, _, service_name = str(spec.get("namespace", "")).partition(".")
            if kind != "services" or not service_name:
                raise ValueError(f"trigger {spec.get('name')!r}: namespace must be services.<service name>")
            trigger = {"id": new_id(), "name": spec["name"], "projectId": app.project_id, "packageId": app.id,
                       "serviceName": service_name, "active": spec.get("active", True), "type": spec["type"],
                       "spec": copy.deepcopy(spec["spec"]), "createdAt": _now()}
            with self._lock:
                self.triggers[trigger["id"]] = trigger
            created.append(trigger)
        return created

    def fire_item_created(self, item_id: str) -> list[JSON]:
        """Start the executions the project's item-created triggers owe a new item; the executions."""
        item = self._item_json(item_id)
        started = []
        for trigger in list(self.triggers.values()):
            spec = trigger["spec"]
            if not (trigger["active"] and trigger["type"] == "Event" and spec.get("resource") == "Item"
                    and "Created" in spec.get("actions", []) and trigger["projectId"] in self._projects_of(item)
                    and dql_match(item, spec.get("filter"))):
                continue
            started.append(self._fire(trigger, item))
        return started

    def _projects_of(self, item: JSON) -> list[str]:
        return list(self.datasets[item["datasetId"]]["projects"])

    def _fire(self, trigger: JSON, item: JSON) -> JSON:
        app = self.apps[trigger["packageId"]]
        module = self._module_of_service(app, trigger["serviceName"])
        function_name = trigger["spec"]["operation"]["functionName"]
        spec = app.function(module, function_name)
        if spec is None:
            raise ValueError(f"trigger {trigger['name']!r}: module {module!r} has no function {function_name!r}")
        item_input = next(io["name"] for io in spec["input"] if io["type"] == "Item")
        service = self.service_for(app, module, trigger["serviceName"])
        execution = self._new_execution(service, function_name, {
            item_input: {"item_id": item["id"], "dataset_id": item["datasetId"]}})
        execution["triggerId"] = trigger["id"]
        self.trigger_executions.append(execution)
        self._start(execution, service)
        return execution

    @staticmethod
    def _module_of_service(app: Any, service_name: str) -> str:
        """The module a service of the app runs: its `components.services` entry."""
        for service in app.manifest["components"].get("services", []):
            if service["name"] == service_name:
                return service["moduleName"]
        raise ValueError(f"app {app.name!r} declares no service {service_name!r} (components.services)")

    # ---------------------------------------------------------------- routes
    def _patch_dataset(self, call: Call, dataset_id: str) -> JSON:
        """dataset.update(): the name and metadata dtlpy sends replace the stored ones."""
        if dataset_id not in self.datasets:
            raise _HttpError(404, f"dataset {dataset_id} not found")
        body = call.json or {}
        with self._lock:
            stored = self.datasets[dataset_id]
            if "name" in body:
                stored["name"] = body["name"]
            if "metadata" in body:
                system = stored["metadata"].get("system", {})
                stored["metadata"] = copy.deepcopy(body["metadata"])
                if call.query.get("system") != ["true"]:
                    stored["metadata"]["system"] = system  # as for items: system metadata needs ?system=true
            stored["updatedAt"] = _now()
        return self.dataset(dataset_id)
