"""The REST routes dtlpy 1.126 calls (base path /api/v1), and their handlers.

`Routes` is mixed into LoopbackPlatform (server.py): `_build_routes` gives the table its dispatcher walks,
each handler takes the recorded `Call` and the path's ids and returns JSON (or a `_Reply` for streams and
headers); `KeyError` means 404, `DqlError` 400, `_HttpError` its own status.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import urllib.parse
import zipfile
from collections.abc import Callable
from typing import Any

from .common import JSON, TEST_USER_EMAIL, _deep_merge, _now, new_id
from .dql import DqlError, dql_match, dql_page, dql_sort
from .wire import Call, _HttpError, _Reply

Route = tuple[str, re.Pattern[str], Callable[..., Any]]


class Routes:
    """The route table and one handler per route."""

    def _build_routes(self) -> list[Route]:
        oid = r"([0-9a-zA-Z_-]+)"
        table: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", r"/users/me", self._get_me),
            ("GET", r"/projects/([^/]+)/name", self._projects_named),
            ("GET", rf"/projects/{oid}", lambda c, pid: self.projects[pid]),
            ("GET", r"/projects", lambda c: list(self.projects.values())),
            ("POST", r"/datasets/query", self._query_datasets),
            ("GET", rf"/datasets/{oid}", lambda c, did: self.dataset(did)),
            ("POST", rf"/datasets/{oid}/query", self._post_dataset_query),
            ("POST", rf"/datasets/{oid}/items", self._upload_item),
            ("POST", rf"/datasets/{oid}/export", self._export),
            ("GET", rf"/commands/{oid}", lambda c, cid: self.commands[cid]),
            ("GET", rf"/items/{oid}", lambda c, iid: self._item_json(iid)),
            ("PATCH", rf"/items/{oid}", self._patch_item),
            ("DELETE", rf"/items/{oid}", self._delete_item),
            ("GET", rf"/items/{oid}/stream", self._stream_item),
            ("GET", rf"/items/{oid}/annotations", lambda c, iid: self.item_annotations(iid)),
            ("POST", rf"/items/{oid}/annotations", self._post_annotations),
            ("GET", rf"/annotations/{oid}", lambda c, aid: self.annotations[aid]),
            ("DELETE", rf"/annotations/{oid}", lambda c, aid: self.annotations.pop(aid) and True),
            ("POST", r"/ml/models/query", self._query_models),
            ("POST", r"/ml/models", self._create_model),
            ("GET", rf"/ml/models/{oid}", lambda c, mid: self.models[mid]),
            ("PATCH", rf"/ml/models/{oid}", self._patch_model),
            ("DELETE", rf"/ml/models/{oid}", lambda c, mid: self.models.pop(mid) and True),
            ("POST", rf"/ml/models/{oid}/clone", self._clone_model),
            ("POST", r"/ml/metrics/publish", self._publish_metrics),
            ("POST", r"/ml/metrics/query", self._query_metrics),
            ("POST", r"/features/sets/query", self._query_feature_sets),
            ("POST", r"/features/sets", self._create_feature_set),
            ("GET", rf"/features/sets/{oid}", lambda c, fid: self.feature_sets[fid]),
            ("DELETE", rf"/features/sets/{oid}", lambda c, fid: self.feature_sets.pop(fid) and True),
            ("POST", r"/features/vectors/query", self._query_vectors),
            ("POST", r"/features/vectors/project-count-aggregation", self._count_vectors),
            ("POST", r"/features/vectors", self._create_vectors),
            ("GET", rf"/features/vectors/{oid}", lambda c, vid: self.feature_vectors[vid]),
            ("DELETE", rf"/features/vectors/{oid}", lambda c, vid: self.feature_vectors.pop(vid) and True),
            ("PATCH", rf"/features/sets/{oid}", self._patch_feature_set),
            ("GET", rf"/recipes/{oid}", lambda c, rid: self.recipes[rid]),
            ("GET", rf"/packages/{oid}", lambda c, pid: self.packages[pid]),  # dtlpy < 1.126 reads a model's
            ("GET", rf"/ontologies/{oid}", lambda c, oid_: self.ontologies[oid_]),
            *self._pipeline_routes(),  # pipelines.py
            *self._execution_routes(),  # executions.py
            *self._registry_routes(),  # registry.py
            *self._trigger_routes(),  # triggers.py
            *self._task_routes(),  # tasks.py
        ]
        return [(m, re.compile(p + r"/?$"), h) for m, p, h in table]

    # ---------------------------------------------------------------- handlers
    def _get_me(self, call: Call) -> JSON:
        return {"id": TEST_USER_EMAIL, "email": TEST_USER_EMAIL, "username": "tester", "type": "human"}

    def _projects_named(self, call: Call, quoted_name: str) -> list[JSON]:
        """dl.projects.get(project_name=...): every project of that name (dtlpy URL-quotes it)."""
        name = urllib.parse.unquote(quoted_name)
        named = [copy.deepcopy(p) for p in self.projects.values() if p["name"] == name]
        if not named:  # the gate answers an error for an unknown name (dtlpy's Projects.__get_by_name says so)
            raise _HttpError(404, f"project {name!r} not found")
        return named

    def _query_datasets(self, call: Call) -> JSON:
        query = call.json or {}
        projects = (query.get("context") or {}).get("projects")
        docs = [
            self.dataset(did)
            for did, d in self.datasets.items()
            # System datasets (Binaries) only show up when the query asks for systemSpace, as on the
            # platform; dtlpy's Artifacts repository sets it to find "Binaries".
            if (query.get("systemSpace") or did not in self._system_datasets)
            and (not projects or set(projects) & set(d["projects"]))
        ]
        return dql_page(dql_sort([d for d in docs if dql_match(d, query.get("filter"))], query.get("sort")), query)

    def _post_dataset_query(self, call: Call, dataset_id: str) -> JSON:
        query = call.json or {}
        if dataset_id not in self.datasets:
            raise _HttpError(404, f"dataset {dataset_id} not found")
        docs = self._query_dataset(dataset_id, query)
        resource = query.get("resource", "items")
        if query.get("delete"):
            store = self.annotations if resource == "annotations" else self.items
            for doc in docs:
                store.pop(doc["id"], None)
            return {"count": len(docs)}
        if "update" in query:
            for doc in docs:
                _deep_merge(self.items[doc["id"]]["metadata"], copy.deepcopy(query["update"].get("metadata", {})))
            return {"count": len(docs)}
        return dql_page(docs, query)

    def _upload_item(
        self, call: Call, dataset_id: str, form: dict[str, tuple[str | None, bytes]] | None = None
    ) -> _Reply:
        if form is None:
            raise DqlError("non-multipart POST /datasets/{id}/items (directory creation) is not supported")
        remote_path = form["path"][1].decode()
        data = form["file"][1]
        mode = (call.query.get("mode") or ["skip"])[0]
        filename = "/" + remote_path.lstrip("/")
        existing = next(
            (i for i, it in self.items.items() if it["datasetId"] == dataset_id and it["filename"] == filename), None
        )
        if existing and mode != "overwrite":
            # mode=skip answers the existing item untouched. Quirk kept on purpose: dtlpy compares its
            # size with the local file and DELETES the item when they differ.
            return _Reply(200, self._item_json(existing), headers={"x-item-op": "skip"})
        item = self._store_item(dataset_id, remote_path, data, item_id=existing)
        if "metadata" in form:
            _deep_merge(item["metadata"], json.loads(form["metadata"][1] or b"{}"))
            item["metadata"]["system"]["size"] = len(data)
        if "description" in form:
            item["description"] = form["description"][1].decode()
        op = "overwrite" if existing else "created"
        if not existing:
            self.fire_item_created(item["id"])  # the platform's Item Created event (triggers.py)
        return _Reply(200, self._item_json(item["id"]), headers={"x-item-op": op})

    def _export(self, call: Call, dataset_id: str) -> JSON:
        """A dataset export finishes at once: the Command's spec.outputItemId holds the result.

        exportType "json": a JSON list of item JSONs with "annotations": [...] inline (what
        BaseModelAdapter.prepare_data reads). No exportType (legacy annotations download): a zip of
        json/<remote path>.json files, one per item.
        """
        payload = call.json or {}
        items_query = copy.deepcopy(payload.get("itemsQuery") or {"filter": {}})
        items_query["resource"] = "items"
        docs = self._query_dataset(dataset_id, items_query)
        ann_cfg = payload.get("annotations") or {}
        ann_filter = (payload.get("annotationsQuery") or {}).get("filter")
        for doc in docs:
            anns = [a for a in self.item_annotations(doc["id"]) if dql_match(a, ann_filter)]
            doc["annotations"] = anns if ann_cfg.get("include", True) else []
        if payload.get("exportType") == "json":
            data, name = json.dumps(docs).encode(), "export.json"
        else:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as zf:
                for doc in docs:
                    zf.writestr(os.path.splitext(doc["filename"].lstrip("/"))[0] + ".json", json.dumps(doc))
            data, name = buffer.getvalue(), "export.zip"
        cid = new_id()
        out = self._store_item(dataset_id, f"/.dataloop/exports/{cid}/{name}", data)
        out["hidden"] = True
        self._export_items.add(out["id"])
        self.commands[cid] = {
            "id": cid,
            "url": f"{self.base_url}/commands/{cid}",
            "status": "success",
            "progress": 100,
            "type": "ExportDatasetAsJson" if payload.get("exportType") == "json" else "ExportDataset",
            "spec": {"outputItemId": out["id"]},
            "error": None,
            "createdAt": _now(),
            "updatedAt": _now(),
        }
        return self.commands[cid]

    def _patch_item(self, call: Call, item_id: str) -> JSON:
        item = self.items[item_id]
        patch = call.json or {}
        for key in ("description", "hidden", "name"):
            if key in patch:
                item[key] = patch[key]
        if "metadata" in patch:  # dtlpy sends the diff (DictDiffer), nested: merged into what is stored
            metadata = copy.deepcopy(patch["metadata"])
            if call.query.get("system") != ["true"]:
                metadata.pop("system", None)  # system metadata changes need ?system=true
            _deep_merge(item["metadata"], metadata)
        return self._item_json(item_id)

    def _delete_item(self, call: Call, item_id: str) -> JSON:
        self.items.pop(item_id)
        self.blobs.pop(item_id, None)
        for aid in [a for a, ann in self.annotations.items() if ann["itemId"] == item_id]:
            self.annotations.pop(aid)
        return {}

    def _stream_item(self, call: Call, item_id: str) -> _Reply:
        data = self.blobs[item_id]
        mimetype = self.items[item_id]["metadata"]["system"]["mimetype"]
        # dtlpy always sends "Range: bytes=<offset>-" and resumes a short download from that offset.
        match = re.fullmatch(r"bytes=(\d+)-", call.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        if start:
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            return _Reply(206, data[start:], content_type=mimetype, headers=headers)
        return _Reply(200, data, content_type=mimetype)

    def _post_annotations(self, call: Call, item_id: str) -> list[JSON]:
        body = call.json if isinstance(call.json, list) else (call.json or {}).get("annotations", [call.json])
        return [copy.deepcopy(self._new_annotation(item_id, ann)) for ann in body]

    def _query_models(self, call: Call) -> JSON:
        query = call.json or {}
        projects = (query.get("context") or {}).get("projects")
        docs = [
            copy.deepcopy(m)
            for m in self.models.values()
            if (not projects or m["context"]["project"] in projects) and dql_match(m, query.get("filter"))
        ]
        return dql_page(dql_sort(docs, query.get("sort")), query)

    def _create_model(self, call: Call) -> JSON:
        body = call.json or {}
        model = self.add_model(
            body["projectId"],
            body["name"],
            body.get("configuration"),
            body.get("datasetId"),
            status=body.get("status", "created"),
            input_type=body.get("inputType", "image"),
            output_type=body.get("outputType", "embedding"),
            package_id=body.get("packageId"),
            module_name=body.get("moduleName", "model-module"),
        )
        stored = self.models[model["id"]]
        stored["metadata"] = _deep_merge(stored["metadata"], copy.deepcopy(body.get("metadata") or {}))
        stored["artifacts"] = copy.deepcopy(body.get("artifacts") or [])
        return stored

    def _patch_model(self, call: Call, model_id: str) -> JSON:
        """dtlpy PATCHes the full model JSON (Model.to_json()); keep server-owned fields."""
        stored = self.models[model_id]
        body = copy.deepcopy(call.json or {})
        for key in ("id", "createdAt", "url", "creator", "projectId"):
            body.pop(key, None)
        stored.update(body)
        stored["updatedAt"] = _now()
        if self.model_status_log[model_id][-1] != stored.get("status"):
            self.model_status_log[model_id].append(stored.get("status"))
        return stored

    def _clone_model(self, call: Call, model_id: str) -> JSON:
        body = call.json or {}
        src = self.models[model_id]
        project_id = body.get("projectId") or src["context"]["project"]
        if any(m["name"] == body["name"] and m["context"]["project"] == project_id for m in self.models.values()):
            # model names are unique in a project (active-learning's Create New Model retries on this 400)
            raise _HttpError(400, f"model name {body['name']!r} already exists in the project")
        model = self.add_model(
            project_id,
            body["name"],
            body.get("configuration", src["configuration"]),
            body.get("datasetId", src["datasetId"]),
            status=body.get("status", "created"),
            input_type=body.get("inputType", src["inputType"]),
            output_type=body.get("outputType", src["outputType"]),
            package_id=body.get("packageId", src["packageId"]),
            module_name=src["moduleName"],
        )
        stored = self.models[model["id"]]
        stored["metadata"] = copy.deepcopy(body.get("metadata") or src["metadata"])
        stored["artifacts"] = copy.deepcopy(src["artifacts"])  # the clone starts from the source's weights
        for key in ("labels", "tags", "description", "scope"):
            if key in body:
                stored[key] = body[key]
        return stored

    def _publish_metrics(self, call: Call) -> list[JSON]:
        samples = call.json if isinstance(call.json, list) else [call.json]
        for sample in samples:
            if sample.get("modelId") not in self.models:
                raise _HttpError(404, f"model {sample.get('modelId')} not found")
            self.metric_samples.append(copy.deepcopy(sample))
        return samples

    def _query_metrics(self, call: Call) -> JSON:
        query = call.json or {}
        return dql_page([s for s in self.metric_samples if dql_match(s, query.get("filter"))], query)

    def _query_feature_sets(self, call: Call) -> JSON:
        query = call.json or {}
        projects = (query.get("context") or {}).get("projects")
        docs = [
            copy.deepcopy(f)
            for f in self.feature_sets.values()
            if (not projects or f["project"] in projects) and dql_match(f, query.get("filter"))
        ]
        return dql_page(dql_sort(docs, query.get("sort")), query)

    def _create_feature_set(self, call: Call) -> list[JSON]:
        body = call.json or {}
        if not isinstance(body.get("size"), int) or body["size"] <= 0:
            raise _HttpError(400, f"feature set size must be a positive integer (got {body.get('size')!r})")
        fid = new_id()
        self.feature_sets[fid] = {
            "id": fid,
            "name": body["name"],
            "type": body.get("type"),
            "entityType": body.get("entityType"),
            "size": body["size"],
            "project": body.get("project"),
            "modelId": body.get("modelId"),
            "org": body.get("org", "loopback-org"),
            "creator": TEST_USER_EMAIL,
            "createdAt": _now(),
            "url": f"{self.base_url}/features/sets/{fid}",
        }
        return [self.feature_sets[fid]]  # the platform answers a LIST with the one created set

    def _patch_feature_set(self, call: Call, feature_set_id: str) -> JSON:
        """feature_set.update(): the name (and tags) change; size, model and project are the platform's."""
        stored = self.feature_sets[feature_set_id]
        for key in ("name", "tags"):
            if key in (call.json or {}):
                stored[key] = copy.deepcopy(call.json[key])
        return stored

    def _create_vectors(self, call: Call) -> list[JSON]:
        body = call.json if isinstance(call.json, list) else [call.json]
        created: list[JSON] = []
        for entry in body:  # validate the whole batch first: the platform rejects it as one request
            fs = self.feature_sets.get(entry.get("featureSetId"))
            if fs is None:
                raise _HttpError(404, f"feature set {entry.get('featureSetId')} not found")
            value = entry.get("value")
            if not isinstance(value, list) or len(value) != fs["size"]:
                got = len(value) if isinstance(value, list) else type(value).__name__
                raise _HttpError(
                    400,
                    f"vector for {entry.get('entityId')} has size {got}, feature set {fs['id']} expects {fs['size']}",
                )
        for entry in body:
            vid = new_id()
            self.feature_vectors[vid] = {
                "id": vid,
                "entityId": entry["entityId"],
                "featureSetId": entry["featureSetId"],
                "value": entry["value"],
                "datasetId": entry.get("datasetId"),
                "project": entry.get("project"),
                "org": entry.get("org", "loopback-org"),
                "creator": TEST_USER_EMAIL,
                "createdAt": _now(),
                "url": f"{self.base_url}/features/vectors/{vid}",
            }
            created.append(copy.deepcopy(self.feature_vectors[vid]))
        return created

    def _query_vectors(self, call: Call) -> JSON:
        query = call.json or {}
        docs = [copy.deepcopy(v) for v in self.feature_vectors.values() if dql_match(v, query.get("filter"))]
        return dql_page(dql_sort(docs, query.get("sort")), query)

    def _count_vectors(self, call: Call) -> list[JSON]:
        body = call.json or {}
        dataset_ids = set(body.get("datasetIds") or [])
        counts: dict[str, int] = {}
        for v in self.feature_vectors.values():
            if not dataset_ids or v.get("datasetId") in dataset_ids:
                counts[v["featureSetId"]] = counts.get(v["featureSetId"], 0) + 1
        return [{"featureSetId": k, "count": n} for k, n in counts.items()]
