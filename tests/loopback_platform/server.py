"""LoopbackPlatform: the HTTP server thread, injected faults, and dispatch of each request to its route.

The entity state lives here (`__init__`); what tests read and seed is in store.py and seeding.py, the REST
routes in routes.py, all mixed into this one class.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .apps import Apps
from .common import API_PREFIX, JSON
from .dql import DqlError
from .executions import Executions
from .pipelines import Pipelines
from .registry import Registry
from .routes import Route, Routes
from .seeding import Seeding
from .store import Store
from .tasks import Tasks
from .triggers import Triggers
from .wire import Call, _HttpError, _parse_multipart, _read_chunked, _Reply


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    kind: str  # "status" | "drop" | "delay" | "truncate"
    status: int = 500
    body: Any = None
    seconds: float = 0.0
    times: int | None = 1  # None: every matching request
    keep: float = 0.5  # "truncate": the share of the body sent before the connection is cut

    def matches(self, method: str, path: str) -> bool:
        return self.times != 0 and self.method in ("*", method) and bool(self.pattern.search(path))


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
            self.wfile.write(payload if reply.cut_after is None else payload[: reply.cut_after])
        if reply.cut_after is not None:  # the stream ends short of its Content-Length: the client sees it cut
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.shutdown(2)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive handler threads would otherwise block server_close()
    platform: LoopbackPlatform


# --------------------------------------------------------------------------------------------- platform
class LoopbackPlatform(Seeding, Store, Routes, Apps, Executions, Pipelines, Registry, Triggers, Tasks):
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
        self.packages: dict[str, JSON] = {}
        self.recipes: dict[str, JSON] = {}
        self.ontologies: dict[str, JSON] = {}
        self.apps: dict[str, Any] = {}  # installed apps (apps.App), by package id
        self.services: dict[str, JSON] = {}
        self.service_executions: dict[str, JSON] = {}
        self.dpks: dict[str, JSON] = {}  # published DPKs (registry.py), by id
        self.triggers: dict[str, JSON] = {}  # installed apps' components.triggers (triggers.py)
        self.trigger_executions: list[JSON] = []  # the executions triggers started, in order
        self.tasks: dict[str, JSON] = {}  # labelling tasks (tasks.py)
        self.assignments: dict[str, JSON] = {}
        self._runner_lock = threading.Lock()
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

    def truncate(self, method: str, path_regex: str, keep: float = 0.5, times: int | None = 1) -> None:
        """Answer normally, but cut the connection after `keep` of the body (a stream that breaks off mid-file,
        as a storage backend or proxy dropping it does): Content-Length promises the whole file."""
        self._faults.append(_Fault(method.upper(), re.compile(path_regex), "truncate", times=times, keep=keep))

    def delay(self, method: str, path_regex: str, seconds: float, times: int | None = None) -> None:
        """Sleep `seconds` before answering matching requests (then answer normally)."""
        self._faults.append(_Fault(method.upper(), re.compile(path_regex), "delay", seconds=seconds, times=times))

    def clear_faults(self) -> None:
        self._faults.clear()

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
            if fault.kind == "truncate":
                reply = self._route(method, path, call, content_type, body)
                call.status = reply.status
                size = len(reply.body) if isinstance(reply.body, bytes) else 0
                reply.cut_after = int(size * fault.keep)
                return reply
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
