"""The publish command (adapters/clip_finetune/dataloop/publish.py) against the stand-in's app registry
(tests/loopback_platform/registry.py), through the real dtlpy client: what reached the registry (versions, runner
images, codebase), the code archive dtlpy uploads, refusals as clean messages, and --dry-run."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from loopback_platform import LoopbackPlatform
from release_support import HUB, release_checkout

from adapters.clip_finetune.dataloop.publish import main

IMAGE = "ghcr.io/acme/clip-finetune:0.2.0"
GIT = "https://github.com/acme/clip-finetune"


@pytest.fixture()
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of what a release publishes: the manifests, the app's code and requirements.txt (dtlpy packs the
    folder, and writes its .dataloop/ scratch folder in the working directory)."""
    monkeypatch.chdir(tmp_path)
    return release_checkout(tmp_path / "checkout")


def _publish(root: Path, *args: str) -> int:
    return main(["--version", "0.2.0", "--project", "releases", "--root", str(root), *args])


def _runtimes(dpk: dict) -> list[dict]:
    return [c["runtime"] for c in [*dpk["components"]["computeConfigs"], *dpk["components"]["services"]]]


def test_publish_sends_one_version_the_image_and_the_git_tag(platform: LoopbackPlatform, checkout: Path) -> None:
    platform.add_project("releases")
    assert _publish(checkout, "--image", IMAGE, "--git-url", GIT) == 0
    (app,) = platform.published("clip-finetune")
    (template,) = platform.published("clip-finetune-and-embed-template")
    assert app["version"] == template["version"] == "0.2.0"
    assert {r["runnerImage"] for r in _runtimes(app)} == {IMAGE}
    assert app["codebase"] == {"type": "git", "gitUrl": GIT, "gitTag": "v0.2.0"}
    assert {"name": "clip-finetune", "version": "0.2.0"} in template["dependencies"]
    assert app["scope"] == "public" and [s["name"] for s in app["components"]["services"]] == ["clip-nodes"]
    # the browser fetches the search panel's script from the published repository at the release's tag
    (panel,) = app["components"]["panels"]
    assert panel["supportedSlots"][0]["configuration"]["invoke"]["source"] == (
        "https://raw.githubusercontent.com/acme/clip-finetune/refs/tags/v0.2.0/panels/tuned-clip-search/search.js")
    # the manifests in the checkout were bumped to what was published
    written = json.loads((checkout / "dataloop.json").read_text())
    assert written["version"] == "0.2.0" and {r["runnerImage"] for r in _runtimes(written)} == {IMAGE}
    assert [c.path for c in platform.calls if c.method == "POST" and "app-registry" in c.path] == ["/app-registry"] * 2
    assert not platform.unhandled


def test_without_git_url_dtlpy_uploads_the_code_and_the_public_images_stay(
    platform: LoopbackPlatform, checkout: Path
) -> None:
    platform.add_project("releases")
    assert _publish(checkout) == 0
    (app,) = platform.published("clip-finetune")
    assert {r["runnerImage"].rsplit(":", 1)[0] for r in _runtimes(app)} == {HUB + "gpu", HUB + "cpu"}
    assert app["codebase"]["type"] == "item"
    archive = zipfile.ZipFile(io.BytesIO(platform.blobs[app["codebase"]["itemId"]]))
    names = set(archive.namelist())
    assert {"adapters/clip_finetune/dataloop/adapter.py", "adapters/clip_finetune/dataloop/nodes.py",
            "requirements.txt", "dataloop.json"} <= names
    assert not [n for n in names if "__pycache__" in n]  # .gitignore'd paths stay out
    assert json.loads(archive.read("dataloop.json"))["version"] == "0.2.0"


def test_a_published_version_is_not_replaced(platform: LoopbackPlatform, checkout: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    platform.add_project("releases")
    assert _publish(checkout, "--git-url", GIT) == 0
    assert _publish(checkout, "--git-url", GIT) == 2
    err = capsys.readouterr().err
    assert "the app registry refused clip-finetune 0.2.0: 409" in err and "already exists" in err
    assert "Traceback" not in err


def test_the_registry_refuses_code_without_the_entry_points(platform: LoopbackPlatform, checkout: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    platform.add_project("releases")
    (checkout / "adapters" / "clip_finetune" / "dataloop" / "nodes.py").unlink()
    assert _publish(checkout) == 2
    err = capsys.readouterr().err
    assert "module clip_nodes: entryPoint adapters/clip_finetune/dataloop/nodes.py is not in the codebase" in err
    assert not platform.published("clip-finetune")


def test_dry_run_writes_the_bumped_manifests_and_publishes_nothing(platform: LoopbackPlatform, checkout: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version", "1.4.2", "--image", IMAGE, "--root", str(checkout), "--dry-run"]) == 0
    app = json.loads((checkout / "dataloop.json").read_text())
    template = json.loads((checkout / "pipeline_templates" / "clip-finetune-and-embed" / "dataloop.json").read_text())
    assert app["version"] == template["version"] == "1.4.2"
    assert {"name": "clip-finetune", "version": "1.4.2"} in template["dependencies"]
    assert {r["runnerImage"] for r in _runtimes(app)} == {IMAGE}
    assert "dry run: clip-finetune 1.4.2 not published" in capsys.readouterr().out
    assert not platform.calls


@pytest.mark.parametrize(("args", "message"), [
    (["--version", "0.2"], "--version '0.2': use MAJOR.MINOR.PATCH"),
    (["--version", "0.2.0", "--image", "gcr.io/viewo-g/piper/agent/runner/apps/clip-finetune:0.2.0"],
     "is Dataloop's own registry, which only Dataloop can push to"),
    (["--version", "0.2.0", "--image", "ghcr.io/acme/clip-finetune"], "not an image reference with a tag"),
    (["--version", "0.2.0"], "--project: name the Dataloop project"),
])
def test_bad_arguments_are_clear_errors_and_change_no_file(args: list[str], message: str, checkout: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = (checkout / "dataloop.json").read_text()
    assert main([*args, "--root", str(checkout)]) == 2
    assert message in capsys.readouterr().err
    assert (checkout / "dataloop.json").read_text() == before


def test_an_unknown_project_is_named(platform: LoopbackPlatform, checkout: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    platform.add_project("releases")
    assert main(["--version", "0.2.0", "--project", "nope", "--root", str(checkout)]) == 2
    assert "--project 'nope': no such project" in capsys.readouterr().err


def test_a_published_release_installs_and_runs_from_its_uploaded_code(platform: LoopbackPlatform,
                                                                      checkout: Path) -> None:
    import dtlpy as dl

    project = dl.projects.get(project_id=platform.add_project("releases")["id"])
    assert _publish(checkout) == 0
    (published,) = platform.published("clip-finetune")
    app = project.apps.install(dpk=dl.Dpk.from_json(published, client_api=dl.client_api, project=project))
    assert (app.dpk_name, app.dpk_version, app.project_id) == ("clip-finetune", "0.2.0", project.id)
    installed = platform.apps[app.id]
    # the app runs the code dtlpy packed and uploaded, unpacked as the agent does, not this checkout
    assert installed.root != checkout and (installed.root / "adapters/clip_finetune/dataloop/nodes.py").is_file()
    assert {m["name"] for m in platform.models.values() if m["packageId"] == app.id} == {
        m["name"] for m in published["components"]["models"]}
    assert not platform.unhandled


def test_a_git_url_outside_github_is_refused_for_the_panel_script(platform: LoopbackPlatform, checkout: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    platform.add_project("releases")
    assert _publish(checkout, "--git-url", "https://gitlab.com/acme/clip-finetune") == 2
    assert "the search panel's script is served from GitHub" in capsys.readouterr().err
    assert not platform.published("clip-finetune")
