"""The stand-in's entities as tests inspect them and as the routes serve them.

`Store` is mixed into LoopbackPlatform (server.py), whose `__init__` holds the dicts these methods read
and write; every route handler and seeding method goes through the helpers here, so an item looks the
same whether a test or dtlpy asks for it.
"""

from __future__ import annotations

import copy
import io
import json
import math
import mimetypes
import re

from .common import JSON, TEST_USER_EMAIL, _deep_merge, _now, new_id
from .dql import DqlError, dql_match, dql_sort
from .wire import Call, _HttpError


class Store:
    """Inspection for tests, and the helpers that create, store and serve entities."""

    # ---------------------------------------------------------------- inspection
    def calls_to(self, method: str, path_regex: str) -> list[Call]:
        rx = re.compile(path_regex)
        return [c for c in self.calls if method.upper() in ("*", c.method) and rx.search(c.path)]

    def project(self, project_id: str) -> JSON:
        return copy.deepcopy(self.projects[project_id])

    def dataset(self, dataset_id: str) -> JSON:
        """The dataset as served (itemsCount counts its visible items)."""
        dataset = copy.deepcopy(self.datasets[dataset_id])
        dataset["itemsCount"] = len(self._visible_items(dataset_id))
        return dataset

    def binaries_dataset(self, project_id: str) -> JSON:
        return next(self.dataset(d) for d in self._system_datasets if project_id in self.datasets[d]["projects"])

    def item(self, item_id: str) -> JSON:
        return self._item_json(item_id)

    def item_bytes(self, item_id: str) -> bytes:
        return self.blobs[item_id]

    def dataset_items(self, dataset_id: str) -> list[JSON]:
        return self._visible_items(dataset_id)

    def item_annotations(self, item_id: str) -> list[JSON]:
        return [copy.deepcopy(a) for a in self.annotations.values() if a["itemId"] == item_id]

    def model(self, model_id: str) -> JSON:
        return copy.deepcopy(self.models[model_id])

    def model_statuses(self, model_id: str) -> list[str]:
        """Every status the model was stored with, in order (creation first)."""
        return list(self.model_status_log[model_id])

    def artifacts(self, model_id: str) -> list[JSON]:
        """Item JSONs of the model's artifacts (the items its `artifacts[].itemId` point at)."""
        refs = self.models[model_id].get("artifacts", [])
        return [
            self._item_json(a.get("itemId") or a.get("id"))
            for a in refs
            if (a.get("itemId") or a.get("id")) in self.items
        ]

    def artifact_files(self, model_id: str) -> dict[str, bytes]:
        """{artifact name: bytes} of the model's artifacts."""
        return {a["name"]: self.blobs[a["id"]] for a in self.artifacts(model_id)}

    def model_feature_sets(self, model_id: str) -> list[JSON]:
        return [copy.deepcopy(fs) for fs in self.feature_sets.values() if fs.get("modelId") == model_id]

    def vectors(self, feature_set_id: str) -> list[JSON]:
        return [copy.deepcopy(v) for v in self.feature_vectors.values() if v["featureSetId"] == feature_set_id]

    def metrics(self, model_id: str) -> list[JSON]:
        return [copy.deepcopy(s) for s in self.metric_samples if s.get("modelId") == model_id]

    def executions(self, pipeline_id: str) -> list[JSON]:
        return [copy.deepcopy(e) for e in self.pipeline_executions.values() if e["pipelineId"] == pipeline_id]

    # ---------------------------------------------------------------- state helpers
    def _new_dataset(self, project_id: str, name: str, system: bool = False) -> JSON:
        did = new_id()
        self.datasets[did] = {
            "id": did,
            "name": name,
            "projects": [project_id],
            "creator": TEST_USER_EMAIL,
            "createdAt": _now(),
            "updatedAt": _now(),
            "readonly": False,
            "annotated": 0,
            "itemsCount": 0,
            "annotationsCount": 0,
            "metadata": {"system": {"system": system}},
            "url": f"{self.base_url}/datasets/{did}",
            "items": f"{self.base_url}/datasets/{did}/items",
            "export": f"{self.base_url}/datasets/{did}/export",
            "accessLevel": "owner",
            "driver": "loopback-driver",
            "readableType": "dataloop",
            "indexDriver": "v2",
        }
        # every dataset gets a default recipe with an empty ontology (dtlpy reads the labels from it, e.g.
        # model.clone(dataset=...))
        oid_, rid = new_id(), new_id()
        self.ontologies[oid_] = {"id": oid_, "title": f"{name} ontology", "roots": [], "metadata": {},
                                 "creator": TEST_USER_EMAIL, "url": f"{self.base_url}/ontologies/{oid_}"}
        self.recipes[rid] = {"id": rid, "title": f"{name} recipe", "ontologyIds": [oid_], "projectIds": [project_id],
                             "creator": TEST_USER_EMAIL, "url": f"{self.base_url}/recipes/{rid}"}
        self.datasets[did]["metadata"]["system"]["recipes"] = [rid]
        if system:
            self._system_datasets.add(did)
        return self.datasets[did]

    def _store_item(
        self, dataset_id: str, remote_path: str, data: bytes, mimetype: str | None = None, item_id: str | None = None
    ) -> JSON:
        if dataset_id not in self.datasets:
            raise _HttpError(404, f"dataset {dataset_id} not found")
        filename = "/" + remote_path.lstrip("/")
        mimetype = mimetype or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        system: JSON = {
            "mimetype": mimetype,
            "size": len(data),
            "originalname": filename.rsplit("/", 1)[-1],
            "encoding": "7bit",
            "refs": [],
            "isBinary": not mimetype.startswith("text"),
        }
        if mimetype.startswith("image/"):
            system.update(_image_size(data))
        if mimetype == "application/json" and _is_prompt_json(data):
            # the platform recognises an uploaded prompt item by its content (dtlpy's PromptUploadElement sends
            # only the JSON) and marks it; assumed, as listed in docs/dataloop.md
            system["shebang"] = {"dltype": "prompt"}
        iid = item_id or new_id()
        old = self.items.get(iid, {})
        self.items[iid] = {
            "id": iid,
            "datasetId": dataset_id,
            "filename": filename,
            "dir": filename.rsplit("/", 1)[0] or "/",
            "name": filename.rsplit("/", 1)[-1],
            "type": "file",
            "hidden": old.get("hidden", False),
            "description": old.get("description"),
            "metadata": _deep_merge(copy.deepcopy(old.get("metadata", {"user": {}})), {"system": system}),
            "creator": TEST_USER_EMAIL,
            "updatedBy": TEST_USER_EMAIL,
            "createdAt": old.get("createdAt", _now()),
            "updatedAt": _now(),
        }
        self.blobs[iid] = data
        return self.items[iid]

    def _item_json(self, item_id: str) -> JSON:
        """The item as the platform serves it (links filled in, annotation counters derived)."""
        item = copy.deepcopy(self.items[item_id])
        n_ann = sum(1 for a in self.annotations.values() if a["itemId"] == item_id)
        item.update(
            {
                "annotated": n_ann > 0,
                "annotationsCount": n_ann,
                "url": f"{self.base_url}/items/{item_id}",
                "stream": self.stream_url(item_id),
                "thumbnail": f"{self.base_url}/items/{item_id}/thumbnail",
                "annotations": f"{self.base_url}/items/{item_id}/annotations",
                "dataset": f"{self.base_url}/datasets/{item['datasetId']}",
            }
        )
        return item

    def _new_annotation(self, item_id: str, ann: JSON) -> JSON:
        item = self.items[item_id]
        aid = new_id()
        metadata = _deep_merge({"system": {}, "user": {}}, copy.deepcopy(ann.get("metadata") or {}))
        self.annotations[aid] = {
            "id": aid,
            "itemId": item_id,
            "datasetId": item["datasetId"],
            "type": ann.get("type", "class"),
            "label": ann.get("label", ""),
            "coordinates": copy.deepcopy(ann.get("coordinates")),
            "attributes": copy.deepcopy(ann.get("attributes", [])),
            "metadata": metadata,
            "source": ann.get("source", "ui"),
            "creator": TEST_USER_EMAIL,
            "updatedBy": TEST_USER_EMAIL,
            "createdAt": _now(),
            "updatedAt": _now(),
            "url": f"{self.base_url}/annotations/{aid}",
            "item": f"{self.base_url}/items/{item_id}",
            "dataset": f"{self.base_url}/datasets/{item['datasetId']}",
        }
        return self.annotations[aid]

    def _visible_items(self, dataset_id: str) -> list[JSON]:
        return [
            self._item_json(i)
            for i, it in self.items.items()
            if it["datasetId"] == dataset_id and i not in self._export_items
        ]

    def _join_ok(self, doc: JSON, join: JSON | None, resource: str) -> bool:
        """DQL join: an item matches if one of its annotations matches join.filter (and vice versa).

        dtlpy spells the foreign-key field "forigen" (sic); only the resource matters here.
        """
        if not join or not join.get("filter"):
            return True
        if (join.get("on") or {}).get("resource") == "feature_vectors":
            return True  # _vector_join filters and ranks these
        if resource == "items":
            return any(dql_match(a, join["filter"]) for a in self.annotations.values() if a["itemId"] == doc["id"])
        return doc["itemId"] in self.items and dql_match(self._item_json(doc["itemId"]), join["filter"])

    def _query_dataset(self, dataset_id: str, query: JSON) -> list[JSON]:
        resource = query.get("resource", "items")
        if resource == "annotations":
            docs = [copy.deepcopy(a) for a in self.annotations.values() if a["datasetId"] == dataset_id]
        elif resource == "items":
            docs = self._visible_items(dataset_id)
        else:
            raise DqlError(f"unsupported dataset query resource {resource!r}")
        docs = [d for d in docs if dql_match(d, query.get("filter")) and self._join_ok(d, query.get("join"), resource)]
        if ((query.get("join") or {}).get("on") or {}).get("resource") == "feature_vectors":
            return self._vector_join(docs, query["join"].get("filter") or {})
        return dql_sort(docs, query.get("sort"))

    def _vector_join(self, items: list[JSON], flt: JSON) -> list[JSON]:
        """Items joined with their feature vector (entityId = item id) in the join filter's feature set, as
        Dataloop's CLIP search panel queries them (clip-smart-search entire.js): items without a matching vector
        drop out; `value: {$euclid: {input, $euclidSort: {eu_dist: "ascending"}}}` ranks the rest by Euclidean
        distance to `input`, nearest first (ties by id)."""
        flt = copy.deepcopy(flt)
        euclid = (flt.pop("value", None) or {}).get("$euclid")
        vectors = {v["entityId"]: v for v in self.feature_vectors.values() if dql_match(v, flt)}
        joined = [i for i in items if i["id"] in vectors]
        if euclid is None:
            return dql_sort(joined, None)
        target = euclid["input"]
        if any(len(vectors[i["id"]]["value"]) != len(target) for i in joined):
            raise _HttpError(400, f"$euclid input has {len(target)} values, the feature set's vectors do not")
        distance = {i["id"]: math.dist(vectors[i["id"]]["value"], target) for i in joined}
        descending = (euclid.get("$euclidSort") or {}).get("eu_dist") == "descending"
        return sorted(joined, key=lambda i: (-distance[i["id"]] if descending else distance[i["id"]], i["id"]))


def _image_size(data: bytes) -> JSON:
    from PIL import Image  # local import: only image items need Pillow

    try:
        with Image.open(io.BytesIO(data)) as img:
            return {"width": img.width, "height": img.height}
    except (OSError, Image.DecompressionBombError):  # hostile test files: the platform stores them anyway
        return {}


def _is_prompt_json(data: bytes) -> bool:
    try:
        content = json.loads(data)
    except ValueError:
        return False
    return isinstance(content, dict) and content.get("shebang") == "dataloop" and \
        (content.get("metadata") or {}).get("dltype") == "prompt"
