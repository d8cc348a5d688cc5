"""The README's publish commands (its "Dataloop app" section), run as written through the real dtlpy client against
the loopback platform, on a copy of what a release publishes; and the release workflow runs the same command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO
from loopback_platform import LoopbackPlatform
from release_support import release_checkout

from adapters.clip_finetune.dataloop.publish import main

PUBLISH = "python -m adapters.clip_finetune.dataloop.publish"


def readme_publish_commands() -> list[list[str]]:
    """Each publish command line of the README's Dataloop section, split as the shell splits it."""
    section = (REPO / "README.md").read_text().split("## Dataloop app", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if PUBLISH in line]


def test_the_readme_dry_run_then_publish_reach_the_registry(platform: LoopbackPlatform, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    commands = readme_publish_commands()
    assert len(commands) == 2 and "--dry-run" in commands[0]
    platform.add_project("My project")
    monkeypatch.chdir(tmp_path)
    checkout = release_checkout(tmp_path / "checkout")
    for words in commands:
        assert " ".join(words[:3]) == PUBLISH
        assert main([*words[3:], "--root", str(checkout)]) == 0
    (app,) = platform.published("clip-finetune")
    (template,) = platform.published("clip-finetune-and-embed-template")
    assert app["version"] == template["version"] == "0.2.0"
    runtimes = [c["runtime"] for c in [*app["components"]["computeConfigs"], *app["components"]["services"]]]
    assert {r["runnerImage"] for r in runtimes} == {"ghcr.io/acme/clip-finetune:0.2.0"}


def test_the_release_workflow_runs_the_readme_command() -> None:
    workflow = (REPO / ".github" / "workflows" / "release.yml").read_text()
    assert PUBLISH in workflow and "--image" in workflow and "--version" in workflow


def test_the_readme_install_line_publishes_and_installs_from_a_checkout(platform: LoopbackPlatform, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dtlpy as dl

    section = (REPO / "README.md").read_text().split("## Dataloop app", 1)[1].split("\n## ", 1)[0]
    (line,) = re.findall(r"`(project\.apps\.install\(.*?\))`", section)
    project = dl.projects.get(project_id=platform.add_project("My project")["id"])
    monkeypatch.chdir(release_checkout(tmp_path / "checkout"))  # "from this repository": its folder
    app = eval(line, {"project": project})  # the README's line, as written
    assert (app.dpk_name, app.project_id) == ("clip-finetune", project.id)
    assert {m["name"] for m in platform.models.values() if m["packageId"] == app.id} == {
        "openclip-vit-b-32", "openclip-xlm-roberta-base-vit-b-32"}
    assert not platform.unhandled
