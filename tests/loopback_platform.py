"""A loopback stand-in of the Dataloop platform that the real dtlpy client talks to in tests.

`LoopbackPlatform` is an in-memory HTTP server on 127.0.0.1 (random port) that answers the routes dtlpy
1.126 uses for train/embed/evaluate flows (base path /api/v1). Seed it from Python (`add_project`,
`add_dataset`, `add_item`, `add_prompt_item`, `add_model`, ...), point dtlpy at it with
`dtlpy_pointed_at(server)` (or the `platform` fixture), run real SDK calls, then assert on what reached the
server: `server.calls`, `server.vectors(feature_set_id)`, `server.model(model_id)`, ...

Every request is recorded. A route the stand-in does not know answers 404 JSON and is also listed in
`server.unhandled`, so a test can assert that dtlpy needed nothing the stand-in lacks.

Faults for reliability tests: `server.fail(method, path_regex, status=500, times=1)`,
`server.drop(...)` (closes the connection without a reply) and `server.delay(..., seconds=...)`.

Fixture: `platform` (defined as `platform_fixture`; import that name into a test module or conftest.py).
dtlpy is imported lazily, so importing this module does not import dtlpy.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import itertools
import json
import math
import mimetypes
import os
import re
import socket
import threading
import time
import types
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

API_PREFIX = "/api/v1"
TEST_USER_EMAIL = "tester@loopback.local"
JSON = dict[str, Any]

_MISSING = object()
_id_counter = itertools.count(1)
_id_lock = threading.Lock()


def new_id() -> str:
    """A 24-hex id shaped like a Mongo ObjectId and increasing, so "sort by id" is creation order.

    dtlpy splits large queries by id ranges (Filters._get_split_filters parses ids as ObjectIds), so ids
    must be valid 12-byte hex.
    """
    with _id_lock:
        return f"{int(time.time()):08x}{next(_id_counter):016x}"


def make_token(email: str = TEST_USER_EMAIL, ttl_s: int = 10 * 365 * 24 * 3600) -> str:
    """An unsigned-looking JWT with a future `exp`: dtlpy decodes it without checking the signature."""

    def b64(obj: Any) -> str:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    payload = {"email": email, "sub": email, "exp": int(time.time()) + ttl_s, "iat": int(time.time())}
    return ".".join([b64({"alg": "HS256", "typ": "JWT"}), b64(payload), b64(b"loopback-signature")])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def tag_subset_filter(tag: str) -> JSON:
    """The subset filter shape of Dataloop's model templates: visible files tagged `tag`."""
    return {"filter": {"$and": [{"hidden": False}, {f"metadata.system.tags.{tag}": True}, {"type": "file"}]}}


# --------------------------------------------------------------------------------------------- DQL engine
def _resolve(doc: Any, dotted: str) -> Any:
    """Value at a dotted path; a list on the way maps over its elements (Mongo semantics)."""
    cur: Any = doc
    for part in dotted.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list):
            found = [_resolve(x, part) for x in cur]
            found = [x for x in found if x is not _MISSING]
            if not found:
                return _MISSING
            cur = found
        else:
            return _MISSING
    return cur


def _glob_regex(pattern: str) -> re.Pattern[str]:
    # The platform's wildcard in dir/filename values spans folders: dtlpy's folder filter sends
    # {"dir": "/f"} OR {"dir": "/f/*"} to mean "folder f and everything below it".
    out = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(f"^{out}$")


def _cmp(actual: Any, expected: Any, op: str) -> bool:
    if actual is _MISSING or actual is None:
        return False
    try:
        return {
            "$gt": actual > expected,
            "$gte": actual >= expected,
            "$lt": actual < expected,
            "$lte": actual <= expected,
        }[op]
    except TypeError:
        return False


def _equals(actual: Any, expected: Any) -> bool:
    if actual is _MISSING:
        return expected is None
    if isinstance(actual, list) and not isinstance(expected, list):
        return any(_equals(a, expected) for a in actual)
    return actual == expected


def _field_matches(actual: Any, cond: Any, key: str) -> bool:
    if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
        return all(_operator(actual, op, val, key) for op, val in cond.items())
    if isinstance(cond, str) and "*" in cond and key.split(".")[-1] in ("dir", "filename"):
        return _operator(actual, "$glob", cond, key)
    return _equals(actual, cond)


def _operator(actual: Any, op: str, val: Any, key: str) -> bool:
    if op == "$eq":
        return _equals(actual, val)
    if op == "$ne":
        return not _equals(actual, val)
    if op == "$in":
        return any(_equals(actual, v) for v in val)
    if op == "$nin":
        return not any(_equals(actual, v) for v in val)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _cmp(actual, val, op)
    if op == "$exists":
        return (actual is not _MISSING) == bool(val)
    if op in ("$glob", "$regex"):
        rx = _glob_regex(val) if op == "$glob" else re.compile(val)
        values = actual if isinstance(actual, list) else [actual]
        return any(isinstance(v, str) and rx.search(v) for v in values)
    raise DqlError(f"unsupported DQL operator {op!r} on {key!r}")


class DqlError(ValueError):
    """A query the stand-in cannot evaluate: answered 400 and recorded in `unhandled`."""


def dql_match(doc: JSON, flt: JSON | None) -> bool:
    """Whether `doc` satisfies a DQL filter ($and/$or/$in/$exists/$eq/$ne/$gt(e)/$lt(e)/$glob, dotted keys)."""
    for key, cond in (flt or {}).items():
        if key == "$and":
            if not all(dql_match(doc, f) for f in cond):
                return False
        elif key == "$or":
            if cond and not any(dql_match(doc, f) for f in cond):
                return False
        elif key == "$nor":
            if any(dql_match(doc, f) for f in cond):
                return False
        elif key.startswith("$"):
            raise DqlError(f"unsupported DQL clause {key!r}")
        elif not _field_matches(_resolve(doc, key), cond, key):
            return False
    return True


def dql_sort(docs: list[JSON], sort: JSON | None) -> list[JSON]:
    """Sort by the query's "sort" ({"id": "ascending"}), default by id ascending as the platform does."""
    keys = list((sort or {"id": "ascending"}).items())
    for key, direction in reversed(keys):
        desc = str(direction).lower() in ("descending", "desc", "-1")

        def sort_key(d: JSON, key: str = key) -> tuple[int, float, str]:
            v = _resolve(d, key)
            if v is _MISSING or v is None:
                return (0, 0.0, "")
            if isinstance(v, int | float):
                return (1, float(v), "")
            return (2, 0.0, v if isinstance(v, str) else json.dumps(v, sort_keys=True))

        docs = sorted(docs, key=sort_key, reverse=desc)
    return docs


def dql_page(docs: list[JSON], query: JSON) -> JSON:
    """The paged reply: `pageSize: 0` only counts (dtlpy uses it for items_count)."""
    page = int(query.get("page", 0) or 0)
    size = int(query.get("pageSize", 1000) if query.get("pageSize") is not None else 1000)
    total = len(docs)
    if size <= 0:
        return {"items": [], "totalItemsCount": total, "totalPagesCount": 0, "hasNextPage": False}
    start = page * size
    return {
        "items": docs[start : start + size],
        "totalItemsCount": total,
        "totalPagesCount": math.ceil(total / size),
        "hasNextPage": start + size < total,
    }


# ---------------------------------------------------------------------------------------- HTTP plumbing
@dataclass
class Call:
    """One recorded request. `path` has no /api/v1 prefix and no query string."""

    method: str
    path: str
    query: dict[str, list[str]]
    json: Any = None
    form: dict[str, Any] | None = None  # multipart fields; file fields as their byte count
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    fault: str | None = None


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    kind: str  # "status" | "drop" | "delay"
    status: int = 500
    body: Any = None
    seconds: float = 0.0
    times: int | None = 1  # None: every matching request

    def matches(self, method: str, path: str) -> bool:
        return self.times != 0 and self.method in ("*", method) and bool(self.pattern.search(path))


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Reply:
    status: int = 200
    body: Any = None  # JSON-able, or bytes for streams
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _read_chunked(rfile: io.BufferedIOBase) -> bytes:
    """De-chunk a `Transfer-Encoding: chunked` body (aiohttp streams uploads that way)."""
    out = bytearray()
    while True:
        line = rfile.readline()
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()  # CRLF after each chunk


def _parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """{field: (filename or None, bytes)} of a multipart/form-data body."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise _HttpError(400, "multipart body without boundary")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + match.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.partition(b"\r\n\r\n")
        disposition = head.decode("utf-8", "replace")
        name = re.search(r'name="([^"]*)"', disposition)
        filename = re.search(r'filename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, content[:-2])  # strip CRLF
    return fields


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: dtlpy's requests session reuses connections
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without NODELAY, Nagle + delayed ACK add ~40 ms per call.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # silence the stderr access log
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(self.rfile)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        reply = self.server.platform._dispatch(self.command, self.path, dict(self.headers), body)
        if reply is None:  # injected connection drop
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive handler threads would otherwise block server_close()
    platform: LoopbackPlatform


Route = tuple[str, re.Pattern[str], Callable[..., Any]]


# --------------------------------------------------------------------------------------------- platform
class LoopbackPlatform:
    """In-memory Dataloop stand-in. Use as a context manager (starts/stops the server thread)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.calls: list[Call] = []
        self.unhandled: list[Call] = []
        self._faults: list[_Fault] = []
        self.projects: dict[str, JSON] = {}
        self.datasets: dict[str, JSON] = {}
        self.items: dict[str, JSON] = {}
        self.blobs: dict[str, bytes] = {}
        self.annotations: dict[str, JSON] = {}
        self.models: dict[str, JSON] = {}
        self.model_status_log: dict[str, list[str]] = {}
        self.feature_sets: dict[str, JSON] = {}
        self.feature_vectors: dict[str, JSON] = {}
        self.metric_samples: list[JSON] = []
        self.commands: dict[str, JSON] = {}
        self.pipelines: dict[str, JSON] = {}
        self.pipeline_executions: dict[str, JSON] = {}
        self._export_items: set[str] = set()  # export outputs: fetchable by id, invisible to queries
        self._system_datasets: set[str] = set()  # "Binaries": listed only for systemSpace queries
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[Route] = self._build_routes()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> LoopbackPlatform:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.platform = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="loopback-platform", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LoopbackPlatform:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """What dtlpy uses as gate URL: http://127.0.0.1:PORT/api/v1."""
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    def stream_url(self, item_id: str) -> str:
        return f"{self.base_url}/items/{item_id}/stream"

    # ---------------------------------------------------------------- faults
    def fail(self, method: str, path_regex: str, status: int = 500, times: int | None = 1, body: Any = None) -> None:
        """The next `times` requests (None: all) whose path matches `path_regex` get `status`.

        `path_regex` is searched in the path without /api/v1 and query, e.g. r"^/features/vectors$".
        """
        body = body if body is not None else {"status": status, "message": f"injected fault {status}"}
        self._faults.append(_Fault(method.upper(), re.compile(path_regex), "status", status, body, times=times))

    def drop(self, method: str, path_regex: str, times: int | None = 1) -> None:
        """Close the connection without answering (a network error on the client side)."""
        self._faults.append(_Fault(method.upper(), re.compile(path_regex), "drop", times=times))

    def delay(self, method: str, path_regex: str, seconds: float, times: int | None = None) -> None:
        """Sleep `seconds` before answering matching requests (then answer normally)."""
        self._faults.append(_Fault(method.upper(), re.compile(path_regex), "delay", seconds=seconds, times=times))

    def clear_faults(self) -> None:
        self._faults.clear()

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

    # ---------------------------------------------------------------- seeding
    def add_project(self, name: str = "loopback-project") -> JSON:
        """A project plus its hidden system dataset "Binaries" (where model artifacts are uploaded)."""
        with self._lock:
            pid = new_id()
            self.projects[pid] = {
                "id": pid,
                "name": name,
                "org": {"id": "loopback-org", "name": "loopback-org"},
                "creator": TEST_USER_EMAIL,
                "createdAt": _now(),
                "updatedAt": _now(),
                "url": f"{self.base_url}/projects/{pid}",
                "role": "owner",
                "accountId": "loopback-account",
            }
            self._new_dataset(pid, "Binaries", system=True)
            return self.project(pid)

    def add_dataset(self, project_id: str, name: str) -> JSON:
        with self._lock:
            return self.dataset(self._new_dataset(project_id, name)["id"])

    def add_item(
        self,
        dataset_id: str,
        content: bytes | str | os.PathLike[str],
        remote_path: str,
        description: str | None = None,
        metadata: JSON | None = None,
        annotations: Sequence[JSON] | None = None,
        tags: Sequence[str] | None = None,
        mimetype: str | None = None,
        hidden: bool = False,
    ) -> JSON:
        """Store an item; `content` is bytes or a local file path. Returns the item JSON.

        `tags` become `metadata.system.tags.<tag> = true` (how Dataloop marks ML subsets); `annotations`
        are partial annotation JSONs ({"type", "label", "coordinates", "metadata"}) completed here.
        """
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        with self._lock:
            item = self._store_item(dataset_id, remote_path, data, mimetype=mimetype)
            item["hidden"] = hidden
            if description is not None:
                item["description"] = description
            _deep_merge(item["metadata"], copy.deepcopy(metadata or {}))
            for tag in tags or ():
                item["metadata"]["system"].setdefault("tags", {})[tag] = True
            for ann in annotations or ():
                self._new_annotation(item["id"], ann)
            return self._item_json(item["id"])

    def add_annotation(self, item_id: str, annotation: JSON) -> JSON:
        with self._lock:
            return copy.deepcopy(self._new_annotation(item_id, annotation))

    def add_prompt_item(
        self,
        dataset_id: str,
        remote_path: str,
        prompts: Sequence[JSON],
        tags: Sequence[str] | None = None,
        metadata: JSON | None = None,
    ) -> JSON:
        """A prompt item as Dataloop stores it: a JSON file with shebang dltype "prompt".

        Each prompt dict: {"image": stream URL | item id | external URL, "text": optional user text,
        "caption": optional str or list of str}. Captions become free-text annotations (type "text",
        label "free-text", coordinates = caption, metadata.system.promptId = "<n>"), as the platform stores
        reviewed responses; the caption is never inside the JSON file.
        """
        body: JSON = {"shebang": "dataloop", "metadata": {"dltype": "prompt"}, "prompts": {}}
        captions: list[tuple[str, str]] = []
        for n, prompt in enumerate(prompts, start=1):
            elements: list[JSON] = []
            if prompt.get("image") is not None:
                elements.append({"mimetype": "image/*", "value": prompt["image"]})
            if prompt.get("text") is not None:
                elements.append({"mimetype": "application/text", "value": prompt["text"]})
            elements.append({"mimetype": "metadata", "value": {"role": "user"}})
            body["prompts"][str(n)] = elements
            caption = prompt.get("caption")
            for text in [caption] if isinstance(caption, str) else caption or []:
                captions.append((str(n), text))
        meta = _deep_merge({"system": {"shebang": {"dltype": "prompt"}}}, copy.deepcopy(metadata or {}))
        annotations = [
            {"type": "text", "label": "free-text", "coordinates": text, "metadata": {"system": {"promptId": pid}}}
            for pid, text in captions
        ]
        return self.add_item(
            dataset_id,
            json.dumps(body).encode(),
            remote_path,
            metadata=meta,
            annotations=annotations,
            tags=tags,
            mimetype="application/json",
        )

    def add_model(
        self,
        project_id: str,
        name: str,
        configuration: JSON | None = None,
        dataset_id: str | None = None,
        subsets: dict[str, JSON] | None = None,
        artifacts: dict[str, bytes] | None = None,
        status: str = "pre-trained",
        input_type: str = "image",
        output_type: str = "embedding",
        package_id: str | None = None,
        module_name: str = "model-module",
    ) -> JSON:
        """A model entity. `subsets`: {"train": DQL filter, ...} (a bare filter gets wrapped in {"filter"}).

        `artifacts` ({file name: bytes}) are stored where dtlpy puts them: the project's Binaries dataset
        under /artifacts/models/<model name>/, referenced as {"type": "item", "itemId"}.
        """
        with self._lock:
            mid = new_id()
            subsets_json = {k: (v if "filter" in v else {"filter": v}) for k, v in (subsets or {}).items()}
            binaries = self.binaries_dataset(project_id)["id"]
            refs = [
                {"type": "item", "itemId": self._store_item(binaries, f"/artifacts/models/{name}/{fname}", data)["id"]}
                for fname, data in (artifacts or {}).items()
            ]
            self.models[mid] = {
                "id": mid,
                "name": name,
                "status": status,
                "datasetId": dataset_id,
                "packageId": package_id or new_id(),
                "projectId": project_id,
                "context": {"project": project_id, "org": "loopback-org"},
                "configuration": copy.deepcopy(configuration or {}),
                "metadata": {"system": {"subsets": subsets_json}},
                "artifacts": refs,
                "inputType": input_type,
                "outputType": output_type,
                "moduleName": module_name,
                "scope": "project",
                "version": "1.0.0",
                "labels": [],
                "tags": [],
                "description": "",
                "creator": TEST_USER_EMAIL,
                "createdAt": _now(),
                "updatedAt": _now(),
                "url": f"{self.base_url}/ml/models/{mid}",
            }
            self.model_status_log[mid] = [status]
            return self.model(mid)

    def add_pipeline(
        self,
        project_id: str,
        name: str,
        nodes: list[JSON] | None = None,
        connections: list[JSON] | None = None,
        variables: list[JSON] | None = None,
    ) -> JSON:
        with self._lock:
            pid = new_id()
            self.pipelines[pid] = {
                "id": pid,
                "name": name,
                "projectId": project_id,
                "orgId": "loopback-org",
                "nodes": nodes or [],
                "connections": connections or [],
                "variables": variables or [],
                "startNodes": [],
                "status": "Installed",
                "creator": TEST_USER_EMAIL,
                "createdAt": _now(),
                "updatedAt": _now(),
                "url": f"{self.base_url}/pipelines/{pid}",
            }
            return copy.deepcopy(self.pipelines[pid])

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
        return dql_sort(
            [d for d in docs if dql_match(d, query.get("filter")) and self._join_ok(d, query.get("join"), resource)],
            query.get("sort"),
        )

    # ---------------------------------------------------------------- dispatch
    def _dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> _Reply | None:
        parsed = urllib.parse.urlsplit(raw_path)
        path = parsed.path[len(API_PREFIX) :] if parsed.path.startswith(API_PREFIX) else parsed.path
        call = Call(method, path, urllib.parse.parse_qs(parsed.query), headers=headers)
        content_type = headers.get("Content-Type", headers.get("content-type", ""))
        if body and "json" in content_type:
            with contextlib.suppress(ValueError):
                call.json = json.loads(body)
        self.calls.append(call)
        delay, fault = self._take_faults(method, path)
        time.sleep(delay)
        if fault is not None:
            call.fault = fault.kind
            if fault.kind == "drop":
                return None
            call.status = fault.status
            return _Reply(fault.status, fault.body)
        reply = self._route(method, path, call, content_type, body)
        call.status = reply.status
        return reply

    def _take_faults(self, method: str, path: str) -> tuple[float, _Fault | None]:
        """Total injected delay for this request, and the first failing fault it consumes (if any)."""
        delay = 0.0
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.times = None if fault.times is None else fault.times - 1
                    if fault.kind != "delay":
                        return delay, fault
                    delay += fault.seconds
        return delay, None

    def _route(self, method: str, path: str, call: Call, content_type: str, body: bytes) -> _Reply:
        for route_method, pattern, handler in self._routes:
            match = pattern.match(path)
            if route_method == method and match:
                try:
                    with self._lock:
                        if "multipart/form-data" in content_type:
                            form = _parse_multipart(body, content_type)
                            call.form = {
                                k: (len(v) if f else v.decode("utf-8", "replace")) for k, (f, v) in form.items()
                            }
                            out = handler(call, *match.groups(), form=form)
                        else:
                            out = handler(call, *match.groups())
                    return out if isinstance(out, _Reply) else _Reply(200, out)
                except KeyError as err:
                    return _Reply(404, {"status": 404, "message": f"not found: {err}"})
                except DqlError as err:
                    self.unhandled.append(call)
                    return _Reply(400, {"status": 400, "message": str(err)})
                except _HttpError as err:
                    return _Reply(err.status, {"status": err.status, "message": str(err)})
        self.unhandled.append(call)
        return _Reply(404, {"status": 404, "message": f"loopback platform has no route {method} {path}"})

    def _build_routes(self) -> list[Route]:
        oid = r"([0-9a-zA-Z_-]+)"
        table: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", r"/users/me", self._get_me),
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
            ("GET", rf"/pipelines/{oid}", lambda c, pid: self.pipelines[pid]),
            ("POST", rf"/pipelines/{oid}/execute", self._execute_pipeline),
        ]
        return [(m, re.compile(p + r"/?$"), h) for m, p, h in table]

    # ---------------------------------------------------------------- handlers
    def _get_me(self, call: Call) -> JSON:
        return {"id": TEST_USER_EMAIL, "email": TEST_USER_EMAIL, "username": "tester", "type": "human"}

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
        if "metadata" in patch:
            system = item["metadata"].get("system", {})
            item["metadata"] = copy.deepcopy(patch["metadata"])
            if call.query.get("system") != ["true"]:
                item["metadata"]["system"] = system  # system metadata changes need ?system=true
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

    def _execute_pipeline(self, call: Call, pipeline_id: str) -> JSON:
        pipeline = self.pipelines[pipeline_id]
        eid = new_id()
        self.pipeline_executions[eid] = {
            "id": eid,
            "pipelineId": pipeline_id,
            "pipeline": {"id": pipeline_id, "name": pipeline["name"]},
            "status": "pending",
            "input": copy.deepcopy((call.json or {}).get("pipeline", call.json)),
            "nodes": [],
            "executions": {},
            "creator": TEST_USER_EMAIL,
            "createdAt": _now(),
            "updatedAt": _now(),
            "url": f"{self.base_url}/pipelines/{pipeline_id}/executions/{eid}",
        }
        return self.pipeline_executions[eid]


def _deep_merge(base: JSON, extra: JSON) -> JSON:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _image_size(data: bytes) -> JSON:
    from PIL import Image  # local import: only image items need Pillow

    try:
        with Image.open(io.BytesIO(data)) as img:
            return {"width": img.width, "height": img.height}
    except (OSError, Image.DecompressionBombError):  # hostile test files: the platform stores them anyway
        return {}


# --------------------------------------------------------------------------------------------- seeding
def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    """A tiny solid-colour PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class SeededProject:
    """What `seed_captioned_images` created: ids, and the item JSONs per subset tag."""

    project: JSON
    dataset: JSON
    items: dict[str, list[JSON]]
    model: JSON | None = None


def seed_captioned_images(
    server: LoopbackPlatform,
    n_train: int = 3,
    n_validation: int = 2,
    n_untagged: int = 1,
    model_name: str | None = None,
    model_configuration: JSON | None = None,
) -> SeededProject:
    """A project with one dataset of tiny PNGs captioned by `description`, tagged train/validation.

    Each image also carries a free-text annotation with its caption. With `model_name`, a model whose
    subsets select the train/validation tags (the reference template's filters) is created too.
    """
    project = server.add_project()
    dataset = server.add_dataset(project["id"], "captioned-images")
    items: dict[str, list[JSON]] = {"train": [], "validation": [], "untagged": []}
    counts = {"train": n_train, "validation": n_validation, "untagged": n_untagged}
    for subset, count in counts.items():
        for i in range(count):
            caption = f"a {subset} picture number {i}"
            items[subset].append(
                server.add_item(
                    dataset["id"],
                    png_bytes((40 * i % 256, 80, 160 if subset == "train" else 20)),
                    f"/images/{subset}/{i}.png",
                    description=caption,
                    tags=[] if subset == "untagged" else [subset],
                    annotations=[{"type": "text", "label": "free-text", "coordinates": caption}],
                )
            )
    model = None
    if model_name is not None:
        model = server.add_model(
            project["id"],
            model_name,
            model_configuration or {},
            dataset["id"],
            subsets={"train": tag_subset_filter("train"), "validation": tag_subset_filter("validation")},
        )
    return SeededProject(project, dataset, items, model)


# ----------------------------------------------------------------------------------- pointing dtlpy at it
def _fast_session() -> Any:
    """dtlpy's requests session with its retry policy kept but its back-off removed.

    dtlpy retries connection errors and 501-511 five times with backoff_factor=1 (about 30 s before an
    error surfaces); tests keep two retries and no sleeping. 500 is not retried, as in dtlpy.
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    retry = Retry(
        total=2,
        read=2,
        connect=2,
        backoff_factor=0,
        allowed_methods=False,
        raise_on_status=False,
        status_forcelist=(501, 502, 503, 504, 505, 506, 507, 508, 510, 511),
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=64, pool_connections=64)
    session.mount("http://", adapter)
    return session


@contextlib.contextmanager
def dtlpy_pointed_at(server: LoopbackPlatform, skip_sdk_sleeps: bool = True) -> Iterator[None]:
    """Point the already-imported (or not yet imported) dtlpy client at `server`, then restore it.

    Works when another test imported dtlpy earlier in the same process: dtlpy caches the gate URL on first
    use, so this registers the server as an environment, `setenv`s it, clears that cache, and also sets
    INTERNAL_REQUESTS_URL (which wins over the environment in ApiClient.base_gate_url).
    `skip_sdk_sleeps` removes the fixed 2 s `time.sleep` dtlpy does after every dataset export request
    (Datasets._export_recursive), which would add 2 s per downloaded subset.
    """
    import dtlpy as dl
    from dtlpy.repositories import datasets as datasets_module

    client = dl.client_api
    saved_env, saved_session = client.environment, client.session
    saved_internal = os.environ.get("INTERNAL_REQUESTS_URL")
    saved_progress = client.verbose.disable_progress_bar
    saved_time = datasets_module.time
    url = server.base_url
    token = make_token()
    client.add_environment(
        environment=url,
        alias=f"loopback-{server.port}",
        token=token,
        gate_url=url,
        url=f"http://127.0.0.1:{server.port}/",
        verify_ssl=True,
    )
    os.environ["INTERNAL_REQUESTS_URL"] = url
    client.setenv(url)
    client.token = token
    client._ApiClient__gate_url_for_requests = None  # dtlpy caches the gate URL on first request
    client.session = _fast_session()
    client.verbose.disable_progress_bar = True
    if skip_sdk_sleeps:
        shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
        shim.sleep = lambda seconds: None
        datasets_module.time = shim
    try:
        yield
    finally:
        datasets_module.time = saved_time
        if saved_internal is None:
            os.environ.pop("INTERNAL_REQUESTS_URL", None)
        else:
            os.environ["INTERNAL_REQUESTS_URL"] = saved_internal
        client.verbose.disable_progress_bar = saved_progress
        # Not setenv(): it checks the token and may try to renew it over the network.
        client.environment = saved_env
        client._token = None
        client._ApiClient__gate_url_for_requests = None
        with contextlib.suppress(Exception):
            client.session.close()
        client.session = saved_session


@pytest.fixture(name="platform")
def platform_fixture() -> Iterator[LoopbackPlatform]:
    """A fresh, empty loopback platform with dtlpy pointed at it (function scope: ~10 ms to start)."""
    with LoopbackPlatform() as server, dtlpy_pointed_at(server):
        yield server
