"""A stand-in of the Hugging Face Hub's HTTP API on 127.0.0.1, for the calls huggingface_hub's create_repo and
upload_folder make (read off huggingface_hub 2.4: hf_api.create_repo, _commit_api, lfs), answering as the Hub
does: 401 without a token, 409 for a repo that exists, binary files sent through LFS (preupload says "lfs";
the batch API hands out an upload URL; the commit names the LFS object by its sha256, which must have been
uploaded), text files inline in the NDJSON commit. Not simulated: the Xet storage protocol (the tests turn
huggingface_hub's Xet path off, as HF_HUB_DISABLE_XET=1 does)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HubStandIn:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.lfs: dict[str, bytes] = {}
        self.private: dict[str, bool] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_PUT(self) -> None:  # the LFS basic transfer: the bytes of one object
                oid = self.path.rsplit("/", 1)[-1]
                data = self._body()
                if hashlib.sha256(data).hexdigest() != oid:
                    return self._send(400, {"error": "sha256 mismatch"})
                hub.lfs[oid] = data
                self._send(200, {})

            def do_POST(self) -> None:
                body = self._body()
                if self.headers.get("authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                if self.path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                        else payload["name"]
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo",
                                                "url": f"{hub.url}/{repo}"})
                    hub.repos[repo], hub.private[repo] = {}, payload.get("visibility") == "private"
                    return self._send(200, {"url": f"{hub.url}/{repo}"})
                if m := re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", self.path):
                    objects = json.loads(body)["objects"]
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"],
                         "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{m.group(1)}/{o['oid']}"}}}
                        for o in objects]})
                if m := re.fullmatch(r"/api/models/(.+)/(preupload|commit)/(\w+)", self.path.split("?")[0]):
                    repo, action = m.group(1), m.group(2)
                    if repo not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    return self._preupload(json.loads(body)) if action == "preupload" else self._commit(repo, body)
                self._send(404, {"error": f"no route {self.path}"})

            def _preupload(self, payload: dict) -> None:
                files = []
                for f in payload["files"]:  # as the Hub: binary content or files over 10 MB go through LFS
                    binary = b"\x00" in base64.b64decode(f["sample"])
                    mode = "lfs" if binary or f["size"] > 10_000_000 else "regular"
                    files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False})
                self._send(200, {"files": files, "commitOid": "0" * 40})

            def _commit(self, repo: str, body: bytes) -> None:
                files = {}
                for line in body.decode().splitlines():
                    entry = json.loads(line)
                    value = entry["value"]
                    if entry["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif entry["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            return self._send(400, {"error": f"LFS object {value['oid']} not found"})
                        files[value["path"]] = hub.lfs[value["oid"]]
                hub.repos[repo].update(files)
                oid = hashlib.sha1(body).hexdigest()
                self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

        return Handler
