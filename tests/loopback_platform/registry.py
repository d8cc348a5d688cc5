"""The app registry (`POST /app-registry`, what dtlpy's `project.dpks.publish` sends): it checks a published DPK
as the platform needs it, keeps it, and answers it with its id.

What dtlpy 1.126 sends (repositories/dpks.py `publish`): `dpk.to_json()`, with `context.project` set and, when
the manifest names no codebase, an item codebase: `project.codebases.pack` zips the folder (less .gitignore'd
paths, .git, .dataloop) and uploads it to the project's Binaries dataset as `/codebases/<name>/<n>.dpk`, then
sends `{"type": "item", "itemId": ...}`. Dataloop's public apps send a git codebase instead (`gitUrl`, `gitTag`).

Checked here, each refusal a 400 naming the field (the real registry's exact rules are not published; these are
what the platform needs later, listed in docs/dataloop.md as assumptions): name, MAJOR.MINOR.PATCH version,
scope, context.project of an existing project; a name and version not published before (409, as a release
cannot be replaced); a git codebase with gitUrl and gitTag, or an item codebase naming an item of the project
that is a zip holding every module's entryPoint (else the service fails at its first start); every compute
config and service with a runtime.runnerImage, every module's computeConfig declared, every service's moduleName
a module; every dependency published (at its version when it names one). Dataloop's Marketplace apps the
templates use (marketplace.py) count as published.
"""

from __future__ import annotations

import atexit
import copy
import io
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .common import JSON, TEST_USER_EMAIL, _now, new_id
from .marketplace import ACTIVE_LEARNING
from .wire import Call, _HttpError

MARKETPLACE = {ACTIVE_LEARNING["name"]: ACTIVE_LEARNING["version"]}
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


class Registry:
    """Mixed into LoopbackPlatform (server.py): published DPKs in `self.dpks`, by id."""

    def _registry_routes(self) -> list[tuple[str, str, Any]]:
        oid = r"([0-9a-zA-Z_-]+)"
        return [
            ("POST", r"/app-registry", self._publish_dpk),
            ("GET", rf"/app-registry/{oid}", lambda c, did: copy.deepcopy(self.dpks[did])),
            ("POST", r"/apps", self._install_published),
        ]

    def published(self, name: str) -> list[JSON]:
        """The DPKs published under `name`, oldest first."""
        return [d for d in self.dpks.values() if d["name"] == name]

    def _publish_dpk(self, call: Call) -> JSON:
        dpk = copy.deepcopy(call.json or {})
        with self._lock:
            problems = self._dpk_problems(dpk)
            if problems:
                raise _HttpError(400, "invalid dpk: " + "; ".join(problems))
            if any(d["name"] == dpk["name"] and d["version"] == dpk["version"] for d in self.dpks.values()):
                raise _HttpError(409, f"dpk {dpk['name']} version {dpk['version']} already exists")
            dpk.update({"id": new_id(), "creator": TEST_USER_EMAIL, "createdAt": _now(), "updatedAt": _now(),
                        "url": f"{self.base_url}/app-registry"})
            self.dpks[dpk["id"]] = dpk
            return copy.deepcopy(dpk)

    def _install_published(self, call: Call) -> JSON:
        """`project.apps.install(dpk)`: install a published DPK's version in a project, running the code of its
        codebase (an item codebase is unpacked, as the platform's agent does; a git codebase cannot be fetched
        here, offline: refused with the reason)."""
        body = call.json or {}
        with self._lock:
            found = [d for d in self.dpks.values()
                     if d["name"] == body.get("dpkName") and d["version"] == body.get("dpkVersion")]
            if not found:
                raise _HttpError(404, f"dpk {body.get('dpkName')} version {body.get('dpkVersion')} is not published")
            if body.get("projectId") not in self.projects:
                raise _HttpError(404, f"project {body.get('projectId')} not found")
            dpk = copy.deepcopy(found[-1])
        app = self.install_app(body["projectId"], dpk, self._unpacked_codebase(dpk))
        return {"id": app.id, "name": body.get("name") or dpk["name"], "projectId": body["projectId"],
                "dpkName": dpk["name"], "dpkVersion": dpk["version"], "scope": body.get("scope") or "project",
                "status": "Installed", "creator": TEST_USER_EMAIL, "createdAt": _now(), "updatedAt": _now(),
                "url": f"{self.base_url}/apps/{app.id}", "metadata": {}, "customInstallation": {}}

    def _unpacked_codebase(self, dpk: JSON) -> Path:
        codebase = dpk.get("codebase") or {}
        if codebase.get("type") != "item":
            raise _HttpError(400, f"the stand-in installs item codebases only (got {codebase.get('type')!r})")
        folder = Path(tempfile.mkdtemp(prefix="loopback-codebase-"))
        atexit.register(shutil.rmtree, folder, True)  # removed when the test run ends
        zipfile.ZipFile(io.BytesIO(self.blobs[codebase["itemId"]])).extractall(folder)
        return folder

    def _dpk_problems(self, dpk: JSON) -> list[str]:
        problems = [f"{key} is missing" for key in ("name", "version", "scope", "components") if not dpk.get(key)]
        if problems:
            return problems
        if not _VERSION.match(str(dpk["version"])):
            problems.append(f"version {dpk['version']!r} is not MAJOR.MINOR.PATCH")
        if dpk["scope"] not in ("public", "organization", "project"):
            problems.append(f"scope {dpk['scope']!r} is unknown")
        if (dpk.get("context") or {}).get("project") not in self.projects:
            problems.append("context.project names no project")
        problems += self._codebase_problems(dpk)
        problems += _component_problems(dpk["components"])
        problems += self._dependency_problems(dpk)
        return problems

    def _codebase_problems(self, dpk: JSON) -> list[str]:
        codebase = dpk.get("codebase") or {}
        modules = dpk["components"].get("modules", [])
        if codebase.get("type") == "git":
            return [f"codebase.{k} is missing" for k in ("gitUrl", "gitTag") if not codebase.get(k)]
        if codebase.get("type") != "item":
            return [f"codebase type {codebase.get('type')!r}: expected git or item"] if modules else []
        item = self.items.get(codebase.get("itemId") or "")
        project = (dpk.get("context") or {}).get("project")
        if item is None or project not in self.datasets[item["datasetId"]]["projects"]:
            return [f"codebase item {codebase.get('itemId')} is not in the project"]
        try:
            names = set(zipfile.ZipFile(io.BytesIO(self.blobs[item["id"]])).namelist())
        except zipfile.BadZipFile:
            return [f"codebase item {item['filename']} is not a zip"]
        return [f"module {m['name']}: entryPoint {m['entryPoint']} is not in the codebase" for m in modules
                if m.get("entryPoint") not in names]

    def _dependency_problems(self, dpk: JSON) -> list[str]:
        problems = []
        for dependency in dpk.get("dependencies") or []:
            name, version = dependency.get("name"), dependency.get("version")
            versions = {d["version"] for d in self.published(name)} | ({MARKETPLACE[name]} if name in MARKETPLACE
                                                                        else set())
            if not versions or (version and version not in versions):
                problems.append(f"dependency {name} {version or ''} is not published".replace("  ", " "))
        return problems


def _component_problems(components: JSON) -> list[str]:
    problems = []
    configs = {c.get("name") for c in components.get("computeConfigs", [])}
    modules = {m.get("name") for m in components.get("modules", [])}
    for holder in [*components.get("computeConfigs", []), *components.get("services", [])]:
        if not (holder.get("runtime") or {}).get("runnerImage"):
            problems.append(f"{holder.get('name')}: runtime.runnerImage is missing")
    for module in components.get("modules", []):
        if module.get("computeConfig") and module["computeConfig"] not in configs:
            problems.append(f"module {module['name']}: computeConfig {module['computeConfig']} is not declared")
    for service in components.get("services", []):
        if service.get("moduleName") not in modules:
            problems.append(f"service {service.get('name')}: moduleName {service.get('moduleName')} is no module")
    return problems
