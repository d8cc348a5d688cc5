"""Labelling tasks, their assignments and item statuses, as dtlpy 1.126 drives them (repositories/tasks.py,
assignments.py, entities/item.py) and as Dataloop documents them.

What the stand-in does: POST /annotationtasks creates the task at once and answers a finished Command whose
spec holds `createTaskPayload` and `createdTaskId` (dtlpy then GETs the task); the task's items are the dataset's
items its `query` (a JSON string of DQL) selects; one assignment per `workload` unit (assignee email + load %),
the items dealt out in proportion to the loads, in id order; each item gets two refs in
`metadata.system.refs`: `{"type": "task", "id"}` and `{"type": "assignment", "id"}` (what `task.get_items`
filters on and `item.status(task_id=...)` reads). POST /assignments/items/tasks/{task}/status (item.update_status,
task.set_status) writes `metadata.status` on both refs ("create") or removes it ("delete"), answering
{item id: status record}. GET /assignments lists a task's assignments. Behaviours not verified against the real
server are listed in docs/dataloop.md ("What the stand-in assumes").
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .common import JSON, TEST_USER_EMAIL, _now, new_id
from .dql import dql_match, dql_page, dql_sort
from .wire import Call, _HttpError

DEFAULT_ACTIONS = [{"action": "completed", "displayName": "Complete", "color": "#00FF00"},
                   {"action": "discard", "displayName": "Discard", "color": "#FF0000"}]


class Tasks:
    """Mixed into LoopbackPlatform (server.py); state in self.tasks and self.assignments."""

    def _task_routes(self) -> list[tuple[str, str, Any]]:
        oid = r"([0-9a-zA-Z_-]+)"
        return [
            ("POST", r"/annotationtasks/query", self._query_tasks),
            ("POST", r"/annotationtasks", self._create_task),
            ("GET", rf"/annotationtasks/{oid}", lambda c, tid: self.tasks[tid]),
            ("GET", r"/assignments", self._list_assignments),
            ("GET", rf"/assignments/{oid}", lambda c, aid: self.assignments[aid]),
            ("POST", rf"/assignments/items/tasks/{oid}/status", self._set_item_status),
            ("PUT", rf"/annotations/{oid}", self._put_annotation),
        ]

    # ---------------------------------------------------------------- inspection
    def task_items(self, task_id: str) -> list[JSON]:
        """The items of a task as served (refs included)."""
        return [self._item_json(i) for i, it in self.items.items()
                if any(r.get("id") == task_id for r in it["metadata"].get("system", {}).get("refs") or [])]

    def task_assignments(self, task_id: str) -> list[JSON]:
        return [copy.deepcopy(a) for a in self.assignments.values() if a["metadata"]["system"]["taskId"] == task_id]

    # ---------------------------------------------------------------- handlers
    def _create_task(self, call: Call) -> JSON:
        body = call.json or {}
        dataset_id = body.get("datasetId")
        if dataset_id not in self.datasets:
            raise _HttpError(404, f"dataset {dataset_id} not found")
        if body.get("recipeId") not in self.recipes:
            raise _HttpError(400, f"recipe {body.get('recipeId')} not found")
        try:
            query = json.loads(body.get("query") or "{}")
        except ValueError as e:
            raise _HttpError(400, f"task query is not JSON: {e}") from e
        items = [i["id"] for i in self._query_dataset(dataset_id, {**query, "resource": "items"})]
        if not items:
            raise _HttpError(400, "the task's query selects no items")
        workload = body.get("workload") or []
        if workload and round(sum(w.get("load", 0) for w in workload)) != 100:
            raise _HttpError(400, "workload loads must add up to 100")
        tid = new_id()
        task = {"id": tid, "name": body["name"], "projectId": body.get("projectId"), "datasetId": dataset_id,
                "recipeId": body["recipeId"], "query": body.get("query"), "taskOwner": body.get("taskOwner"),
                "spec": body.get("spec") or {"type": "annotation"}, "dueDate": body.get("dueDate"),
                "priority": body.get("priority"), "metadata": copy.deepcopy(body.get("metadata") or {}),
                "availableActions": copy.deepcopy(body.get("availableActions") or DEFAULT_ACTIONS),
                "status": "open", "progress": 0, "totalItems": len(items), "assignmentIds": [],
                "creator": TEST_USER_EMAIL, "createdAt": _now(), "updatedAt": _now(),
                "url": f"{self.base_url}/annotationtasks/{tid}"}
        self.tasks[tid] = task
        for unit, share in zip(workload, _deal(items, [w.get("load", 0) for w in workload]), strict=True):
            task["assignmentIds"].append(self._new_assignment(task, unit["assigneeId"], share))
        for item_id in items:
            refs = self.items[item_id]["metadata"].setdefault("system", {}).setdefault("refs", [])
            refs.append({"type": "task", "id": tid})
        return self._finished_command("CreateTask", {"createTaskPayload": copy.deepcopy(body), "createdTaskId": tid})

    def _new_assignment(self, task: JSON, annotator: str, items: list[str]) -> str:
        aid = new_id()
        self.assignments[aid] = {
            "id": aid, "name": f"{task['name']} ({annotator})", "annotator": annotator, "status": "open",
            "projectId": task["projectId"], "totalItems": len(items), "createdAt": _now(), "updatedAt": _now(),
            "metadata": {"system": {"taskId": task["id"], "datasetId": task["datasetId"]}},
            "url": f"{self.base_url}/assignments/{aid}"}
        for item_id in items:
            self.items[item_id]["metadata"].setdefault("system", {}).setdefault("refs", []).append(
                {"type": "assignment", "id": aid})
        return aid

    def _finished_command(self, kind: str, spec: JSON) -> JSON:
        cid = new_id()
        self.commands[cid] = {"id": cid, "url": f"{self.base_url}/commands/{cid}", "status": "success",
                              "progress": 100, "type": kind, "spec": spec, "error": None, "createdAt": _now(),
                              "updatedAt": _now()}
        return self.commands[cid]

    def _query_tasks(self, call: Call) -> JSON:
        query = call.json or {}
        projects = (query.get("context") or {}).get("projectIds")
        docs = [copy.deepcopy(t) for t in self.tasks.values()
                if (not projects or t["projectId"] in projects) and dql_match(t, query.get("filter"))]
        return dql_page(dql_sort(docs, query.get("sort")), query)

    def _list_assignments(self, call: Call) -> JSON:
        task_id = (call.query.get("taskId") or [None])[0]
        projects = ",".join(call.query.get("projects") or []).split(",")
        docs = [copy.deepcopy(a) for a in self.assignments.values()
                if a["projectId"] in projects and (task_id is None or a["metadata"]["system"]["taskId"] == task_id)]
        return {"items": docs, "totalItemsCount": len(docs), "totalPagesCount": 1, "hasNextPage": False}

    def _set_item_status(self, call: Call, task_id: str) -> JSON:
        task = self.tasks[task_id]
        body = call.json or {}
        payload = body.get("statusPayload") or {}
        operation, status = payload.get("operation"), payload.get("status")
        if operation not in ("create", "delete") or not status:
            raise _HttpError(400, f"statusPayload needs operation create|delete and a status (got {payload})")
        allowed = {a["action"] for a in task["availableActions"]} | {"approved", "discarded"}
        if operation == "create" and status not in allowed:
            raise _HttpError(400, f"status {status!r} is not an action of task {task['name']!r}")
        done = {}
        for item_id in body.get("itemIds") or []:
            refs = self.items.get(item_id, {}).get("metadata", {}).get("system", {}).get("refs") or []
            ours = [r for r in refs if r.get("id") == task_id or r.get("id") in task["assignmentIds"]]
            for ref in ours:
                meta = ref.setdefault("metadata", {})
                if operation == "create":
                    meta.update(status=status, timestamp=_now(), creator=TEST_USER_EMAIL)
                else:
                    meta.pop("status", None)
            if ours:
                done[item_id] = {"status": status, "operation": operation, "taskId": task_id}
        return done

    def _put_annotation(self, call: Call, annotation_id: str) -> JSON:
        """dtlpy sends the diff of the annotation (DictDiffer): merged into the stored one; system metadata only
        with ?system=true."""
        stored = self.annotations[annotation_id]
        patch = copy.deepcopy(call.json or {})
        system = (patch.get("metadata") or {}).pop("system", None)
        for key in ("id", "itemId", "datasetId", "creator", "createdAt", "url"):
            patch.pop(key, None)
        _merge(stored, patch)
        if system and call.query.get("system") == ["true"]:
            _merge(stored["metadata"].setdefault("system", {}), system)
        stored["updatedAt"] = _now()
        return copy.deepcopy(stored)


def _merge(base: JSON, extra: JSON) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _deal(items: list[str], loads: list[float]) -> list[list[str]]:
    """The items split in proportion to the loads (percentages), in order; rounding leftovers go to the last."""
    shares, start = [], 0
    for n, load in enumerate(loads):
        end = len(items) if n == len(loads) - 1 else start + round(len(items) * load / 100)
        shares.append(items[start:end])
        start = end
    return shares
