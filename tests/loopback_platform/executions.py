"""Executions: a function of an installed app run on one of its services, as the platform's agent runs it.

Routes: POST /executions/{serviceId} (dtlpy's service.execute), GET /executions/{id} (execution.wait polls it),
GET /services/{id}, and POST /ml/models/{id}/train (model.train: the platform's model management runs
train_model of the model's own app, on a service whose init input is the model). An execution created through a
route runs in a background thread, as on a replica: the reply is the execution, status "created", and the
client waits on it. The pipeline engine (pipelines.py) runs node functions with `execute_now`, on its own thread.
"""

from __future__ import annotations

import copy
import logging
import threading
import traceback
from typing import Any

from .apps import to_json_value
from .common import JSON, TEST_USER_EMAIL, _now, new_id
from .wire import Call, _HttpError

log = logging.getLogger(__name__)

# What the platform's model management offers an `ml` node, and the model-app function each one calls
# (dtlpy BaseModelAdapter's service functions; every ML node of dataloop-ai-apps/pipeline-templates uses one).
ML_FUNCTIONS = {"train": "train_model", "evaluate": "evaluate_model", "predict": "predict_items",
                "embed": "embed_items"}


class Executions:
    """Mixed into LoopbackPlatform (server.py)."""

    def _execution_routes(self) -> list[tuple[str, str, Any]]:
        oid = r"([0-9a-zA-Z_-]+)"
        return [
            ("POST", rf"/executions/{oid}", self._create_execution),
            ("GET", rf"/executions/{oid}", lambda c, eid: copy.deepcopy(self.service_executions[eid])),
            ("GET", rf"/services/{oid}", lambda c, sid: self.services[sid]),
            ("POST", rf"/ml/models/{oid}/train", self._train_model),
        ]

    # ---------------------------------------------------------------- routes
    def _create_execution(self, call: Call, service_id: str) -> JSON:
        service = self.services.get(service_id)
        if service is None:
            raise _HttpError(404, f"service {service_id} not found")
        body = call.json or {}
        function_name = body.get("functionName")
        if self.apps[service["packageId"]].function(service["moduleName"], function_name) is None:
            raise _HttpError(400, f"service {service['name']!r} has no function {function_name!r}")
        execution = self._new_execution(service, function_name, body.get("input") or {})
        self._start(execution, service)
        return copy.deepcopy(execution)

    def _train_model(self, call: Call, model_id: str) -> JSON:
        """model.train(): train_model of the model's app, on the model's own service."""
        model = self.models[model_id]
        service = self.model_service(model)
        execution = self._new_execution(service, "train_model", {"model": {"model_id": model_id}})
        self._start(execution, service, init={"model_entity": model_id})
        return copy.deepcopy(execution)

    # ---------------------------------------------------------------- running
    def model_service(self, model: JSON) -> JSON:
        """The service model management runs the model's app on (its module, the model as init input)."""
        app = self.apps.get(model["packageId"])
        if app is None:
            raise _HttpError(400, f"model {model['name']!r}: its package {model['packageId']} is not an installed app")
        return self.service_for(app, model["moduleName"], f"model-mgmt-{model['id']}")

    def _new_execution(self, service: JSON, function_name: str, inputs: JSON, pipeline: JSON | None = None) -> JSON:
        eid = new_id()
        execution = {
            "id": eid, "serviceId": service["id"], "projectId": service["projectId"], "functionName": function_name,
            "packageId": service["packageId"], "packageName": service["packageName"], "input": copy.deepcopy(inputs),
            "output": None, "latestStatus": {"status": "created", "percentComplete": 0, "message": None},
            "statusLog": [], "creator": TEST_USER_EMAIL, "createdAt": _now(), "updatedAt": _now(),
            "attempts": 1, "maxAttempts": 1, "toTerminate": False, "url": f"{self.base_url}/executions/{eid}",
        }
        if pipeline is not None:
            execution["pipeline"] = copy.deepcopy(pipeline)
        with self._lock:
            self.service_executions[eid] = execution
        return execution

    def _start(self, execution: JSON, service: JSON, init: JSON | None = None) -> None:
        threading.Thread(target=self.execute_now, args=(execution, service, init), daemon=True,
                         name=f"execution-{execution['id']}").start()

    def execute_now(self, execution: JSON, service: JSON, init: JSON | None = None) -> Any:
        """Run the execution on this thread; its return value (None when it failed: see latestStatus)."""
        self._set_status(execution, "in-progress")
        try:
            output = self.run_function(service, execution["functionName"], execution["input"], execution, init,
                                       execution.get("pipeline"))
        except Exception as e:  # the platform records the failure on the execution
            log.warning("execution %s (%s) failed:\n%s", execution["id"], execution["functionName"],
                        traceback.format_exc())
            execution["error"] = traceback.format_exc()
            self._set_status(execution, "failed", f"{type(e).__name__}: {e}")
            return None
        execution["output"] = to_json_value(output) if not isinstance(output, tuple) else [
            to_json_value(o) for o in output]
        self._set_status(execution, "success")
        return output

    def _set_status(self, execution: JSON, status: str, message: str | None = None) -> None:
        with self._lock:
            latest = execution["latestStatus"]
            latest.update({"status": status, "timestamp": _now()})
            if message is not None:
                latest["message"] = message
            if status == "success":
                latest["percentComplete"] = 100
            execution["statusLog"].append(copy.deepcopy(latest))
            execution["updatedAt"] = _now()
