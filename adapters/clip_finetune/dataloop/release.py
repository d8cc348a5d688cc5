"""A release of the app: the manifests with one version everywhere (the app's dataloop.json, each pipeline
template's manifest and its dependency on the app, the git codebase's tag), every service's runner image set, and
the result checked with dtlpy's own loaders before anything is written or published. publish.py is the command.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dtlpy as dl

from adapters.clip_finetune.errors import ConfigError
from adapters.clip_finetune.files import atomic_write

JSON = dict[str, Any]
APP_MANIFEST = "dataloop.json"
TEMPLATE_MANIFESTS = "pipeline_templates/*/dataloop.json"
# Dataloop's app registry takes MAJOR.MINOR.PATCH versions (every public app's manifest has one)
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
# an image reference with an explicit tag: [registry[:port]/]path:tag (Docker's grammar, lower-case path)
_IMAGE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::\d+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)+:[\w][\w.-]{0,127}$")
# Dataloop's own registry: their apps name it, but only Dataloop can push there
_PRIVATE_REGISTRY = "gcr.io/viewo-g/"


@dataclass
class Release:
    """The manifests of one release: the app's, and each pipeline template's by its path."""

    app: JSON
    templates: dict[Path, JSON]

    def runtimes(self) -> list[JSON]:
        """Every runtime the app declares: its compute configs' and its services'."""
        components = self.app["components"]
        return [c["runtime"] for c in [*components.get("computeConfigs", []), *components.get("services", [])]]


def load_release(root: Path) -> Release:
    """The app manifest and the pipeline templates' manifests of the repository at `root`."""
    path = root / APP_MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path}: no app manifest there; give --root the repository's folder")
    templates = {p: _read(p) for p in sorted(root.glob(TEMPLATE_MANIFESTS))}
    return Release(_read(path), templates)


def _read(path: Path) -> JSON:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix the file") from e


def bumped(release: Release, version: str, image: str | None = None, git_url: str | None = None) -> Release:
    """A copy of `release` at `version`: the app's and each template's version, each template's dependency on the
    app, the git codebase (`git_url`, tag `v<version>`, the tag the release workflow runs on) and, when `image` is
    given, every runtime's runnerImage (else the images stay as they are: Dataloop's public ones as shipped)."""
    if not _VERSION.match(version or ""):
        raise ConfigError(f"--version {version!r}: use MAJOR.MINOR.PATCH, e.g. 0.2.0 (a tag v0.2.0 gives 0.2.0)")
    if image is not None:
        check_image(image)
    out = Release(copy.deepcopy(release.app), copy.deepcopy(release.templates))
    out.app["version"] = version
    if git_url:
        out.app["codebase"] = {"type": "git", "gitUrl": git_url, "gitTag": f"v{version}"}
    for runtime in out.runtimes():
        if image is not None:
            runtime["runnerImage"] = image
    for panel in out.app["components"].get("panels", []):
        for slot in panel.get("supportedSlots", []):
            invoke = (slot.get("configuration") or {}).get("invoke") or {}
            if invoke.get("source"):
                invoke["source"] = panel_source(invoke["source"], version, git_url)
    for template in out.templates.values():
        template["version"] = version
        for dependency in template.get("dependencies", []):
            if dependency.get("name") == out.app["name"]:
                dependency["version"] = version
        if template.get("codebase", {}).get("type") == "git":
            template["codebase"]["gitTag"] = f"v{version}"
    return out


# a panel script's URL: the file at a tag of a GitHub repository, as raw.githubusercontent.com serves it
_RAW = re.compile(r"^https://raw\.githubusercontent\.com/(?P<repo>[^/]+/[^/]+)/refs/tags/[^/]+/(?P<path>.+)$")
_GITHUB = re.compile(r"^https://github\.com/(?P<repo>[^/]+/[^/]+?)(?:\.git)?/?$")


def panel_source(source: str, version: str, git_url: str | None) -> str:
    """The panel script's URL at this release's tag (v<version>, the tag the release workflow runs on), in the
    repository `git_url` names when given (the browser fetches the script from there, not from the codebase)."""
    raw = _RAW.match(source)
    if raw is None:
        return source
    repo = raw.group("repo")
    if git_url:
        github = _GITHUB.match(git_url)
        if github is None:
            raise ConfigError(f"--git-url {git_url!r}: the search panel's script is served from GitHub; use "
                              "https://github.com/OWNER/REPO")
        repo = github.group("repo")
    return f"https://raw.githubusercontent.com/{repo}/refs/tags/v{version}/{raw.group('path')}"


def check_image(image: str) -> None:
    """Refuse an image Dataloop could not pull: no tag, not a reference, or Dataloop's own registry."""
    if image.startswith(_PRIVATE_REGISTRY):
        raise ConfigError(f"--image {image}: {_PRIVATE_REGISTRY} is Dataloop's own registry, which only Dataloop can "
                          "push to; push the image to a public registry (e.g. ghcr.io/<owner>/clip-finetune:<version>)")
    if not _IMAGE.match(image):
        raise ConfigError(f"--image {image!r}: not an image reference with a tag; use REGISTRY/NAME:TAG, "
                          "e.g. ghcr.io/<owner>/clip-finetune:0.2.0")


def validate(release: Release) -> None:
    """Check the manifests as the platform will need them, with dtlpy's loaders; raise ConfigError naming every
    problem (the file and the field)."""
    problems = [f"{APP_MANIFEST}: {p}" for p in _app_problems(release.app)]
    for path, template in release.templates.items():
        problems += [f"{path.parent.name}/{path.name}: {p}" for p in _template_problems(template, release.app)]
    if problems:
        raise ConfigError("the release's manifests are not publishable:\n" + "\n".join(problems))


def _app_problems(app: JSON) -> list[str]:
    problems = _dpk_problems(app)
    components = app.get("components", {})
    modules = {m["name"]: m for m in components.get("modules", [])}
    configs = {c["name"] for c in components.get("computeConfigs", [])}
    for module in modules.values():
        named = [module.get("computeConfig"), *(f.get("computeConfig") for f in module.get("functions", []))]
        problems += [f"module {module['name']}: computeConfig {c!r} is not declared" for c in named
                     if c and c not in configs]
        for function in module.get("functions", []):
            for io in [*function.get("input", []), *function.get("output", [])]:
                try:
                    dl.FunctionIO(**io)  # dtlpy's own type check of an input/output
                except Exception as e:  # noqa: BLE001 - dtlpy raises several types; each is a manifest problem
                    problems.append(f"{module['name']}.{function['name']} {io.get('name')!r}: {e}")
    for service in components.get("services", []):
        if service.get("moduleName") not in modules:
            problems.append(f"service {service.get('name')}: moduleName {service.get('moduleName')!r} is no module")
    for holder in [*components.get("computeConfigs", []), *components.get("services", [])]:
        if not (holder.get("runtime") or {}).get("runnerImage"):
            problems.append(f"{holder.get('name')}: runtime.runnerImage is empty")
    return problems


def _template_problems(template: JSON, app: JSON) -> list[str]:
    problems = _dpk_problems(template)
    dependency = next((d for d in template.get("dependencies", []) if d.get("name") == app["name"]), None)
    if dependency is not None and dependency.get("version", app["version"]) != app["version"]:
        problems.append(f"depends on {app['name']} {dependency['version']}, the app is {app['version']}")
    if template.get("version") != app["version"]:
        problems.append(f"version {template.get('version')} is not the app's {app['version']}")
    return problems


def _dpk_problems(manifest: JSON) -> list[str]:
    problems = []
    try:
        dpk = dl.Dpk.from_json(_json=copy.deepcopy(manifest))
    except Exception as e:  # noqa: BLE001 - dtlpy's loader raises whatever its properties do
        return [f"dtlpy cannot load it: {e}"]
    if not _VERSION.match(str(dpk.version)):
        problems.append(f"version {dpk.version!r} is not MAJOR.MINOR.PATCH")
    if dpk.scope not in ("public", "organization", "project"):
        problems.append(f"scope {dpk.scope!r} is not public, organization or project")
    return problems


def write(release: Release, root: Path) -> list[Path]:
    """Write the release's manifests in place (2-space JSON, as the repository keeps them); the paths written."""
    files = {root / APP_MANIFEST: release.app, **release.templates}
    for path, manifest in files.items():
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return list(files)
