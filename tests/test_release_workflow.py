"""The release workflow (.github/workflows/release.yml): on a v* tag it builds the Dockerfile, pushes it to a public
registry, and runs the publish command with that image. Its own shell step is run here for a tag, and its publish
command line, with the step outputs and GitHub's context filled in, is run as written against the stand-in."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO
from loopback_platform import LoopbackPlatform
from release_support import release_checkout

from adapters.clip_finetune.dataloop.publish import main

WORKFLOW = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
(JOB,) = WORKFLOW["jobs"].values()
STEPS: list[dict[str, Any]] = JOB["steps"]
PUBLISH = "python -m adapters.clip_finetune.dataloop.publish"


def _step(predicate: Any) -> tuple[int, dict[str, Any]]:
    (found,) = [(i, s) for i, s in enumerate(STEPS) if predicate(s)]
    return found


def _release_outputs(tag: str, owner: str, tmp_path: Path) -> dict[str, str]:
    """Run the workflow's `release` step (bash, as the runner does) for a tag; its step outputs."""
    _, step = _step(lambda s: s.get("id") == "release")
    output = tmp_path / "github_output"
    env = {**os.environ, "GITHUB_REF_NAME": tag, "GITHUB_REPOSITORY_OWNER": owner, "GITHUB_OUTPUT": str(output)}
    subprocess.run(["bash", "-e", "-c", step["run"]], env=env, check=True)
    return dict(line.split("=", 1) for line in output.read_text().splitlines())


def test_it_runs_on_version_tags_only() -> None:
    trigger = WORKFLOW.get("on", WORKFLOW.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert trigger == {"push": {"tags": ["v*"]}}


def test_the_tag_gives_the_version_and_a_lower_case_ghcr_image(tmp_path: Path) -> None:
    assert _release_outputs("v0.2.0", "Acme-Labs", tmp_path) == {
        "version": "0.2.0", "image": "ghcr.io/acme-labs/clip-finetune:0.2.0"}


def test_it_pushes_the_dockerfile_image_before_publishing() -> None:
    build_at, build = _step(lambda s: str(s.get("uses", "")).startswith("docker/build-push-action"))
    publish_at, _ = _step(lambda s: PUBLISH in str(s.get("run", "")))
    login_at, login = _step(lambda s: str(s.get("uses", "")).startswith("docker/login-action"))
    assert login["with"]["registry"] == "ghcr.io" and login_at < build_at < publish_at
    assert build["with"] == {"context": ".", "push": True, "tags": "${{ steps.release.outputs.image }}"}
    assert JOB.get("permissions", WORKFLOW.get("permissions", {})).get("packages") == "write"


def test_it_publishes_with_the_api_key_from_secrets() -> None:
    _, publish = _step(lambda s: PUBLISH in str(s.get("run", "")))
    assert publish["env"] == {"DATALOOP_API_KEY": "${{ secrets.DATALOOP_API_KEY }}"}


def test_its_publish_command_runs_as_written(platform: LoopbackPlatform, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = _release_outputs("v0.3.1", "acme", tmp_path)
    context = {"steps.release.outputs.version": outputs["version"], "steps.release.outputs.image": outputs["image"],
               "github.server_url": "https://github.com", "github.repository": "acme/clip-finetune",
               "vars.DATALOOP_PROJECT": "Release project"}
    _, publish = _step(lambda s: PUBLISH in str(s.get("run", "")))
    command = re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: context[m.group(1)], publish["run"])
    words = shlex.split(command)
    assert " ".join(words[:3]) == PUBLISH
    platform.add_project("Release project")
    monkeypatch.chdir(tmp_path)
    checkout = release_checkout(tmp_path / "checkout")
    assert main([*words[3:], "--root", str(checkout)]) == 0
    (app,) = platform.published("clip-finetune")
    assert app["version"] == "0.3.1"
    assert app["codebase"] == {"type": "git", "gitUrl": "https://github.com/acme/clip-finetune", "gitTag": "v0.3.1"}
    runtimes = [c["runtime"] for c in [*app["components"]["computeConfigs"], *app["components"]["services"]]]
    assert {r["runnerImage"] for r in runtimes} == {"ghcr.io/acme/clip-finetune:0.3.1"}
