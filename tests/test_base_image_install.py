"""requirements.txt installs on Dataloop's public runner images without replacing what they keep: pip resolves it
(from the package index, `--dry-run --report`) in a throwaway environment that holds stub .dist-info folders of
each image's package set (docker/base-images/), as it does at a service's start on the platform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from release_support import KEPT, image_file, package_set, pip_plan, stub_environment

MANIFEST = json.loads((REPO / "dataloop.json").read_text())
RUNTIMES = [*MANIFEST["components"]["computeConfigs"], *MANIFEST["components"].get("services", [])]
IMAGES = sorted({c["runtime"]["runnerImage"] for c in RUNTIMES})
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
NEEDED = [Requirement(r) for r in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["multilingual"]]]


@pytest.fixture(scope="module", params=IMAGES)
def resolved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """(the image's package set, pip's plan for requirements.txt on top of it)."""
    base = package_set(image_file(request.param))
    root = tmp_path_factory.mktemp("image")
    python = stub_environment(root / "env", base)
    return base, pip_plan(python, REPO / "requirements.txt", root / "report.json")


def test_the_manifest_names_only_images_whose_package_set_is_written_down() -> None:
    assert len(IMAGES) == 2  # the GPU image for training, the CPU image for the rest
    for image in IMAGES:
        assert image_file(image).is_file(), f"docker/base-images/ has no package set for {image}"


def test_the_images_keep_their_torch_dtlpy_pyjwt_attrs_and_validators(resolved: tuple[dict, dict]) -> None:
    base, plan = resolved
    assert KEPT - {"torchaudio"} <= set(base)
    changed = {name: f"{base[name]} -> {plan[name]}" for name in KEPT & set(plan)}
    assert not changed, f"requirements.txt would replace what the image keeps: {changed}"


def test_what_the_app_needs_is_planned_or_already_in_the_image(resolved: tuple[dict, dict]) -> None:
    base, plan = resolved
    assert {"open-clip-torch", "timm", "safetensors", "transformers", "matplotlib"} <= set(plan)
    after = {**base, **plan}
    for requirement in NEEDED:
        name = canonicalize_name(requirement.name)
        assert name in after, f"{requirement} is neither in the image nor installed by requirements.txt"
        assert requirement.specifier.contains(after[name]), f"{name}=={after[name]} is outside {requirement}"


def test_requirements_txt_installs_neither_this_package_nor_what_the_image_keeps() -> None:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    names = {canonicalize_name(Requirement(line).name) for line in lines if line and not line.startswith("-")}
    assert not names & (KEPT | {"clip-finetune", "numpy", "pillow", "pydantic"})
    assert not any(line in (".", "-e .") or line.startswith(".[") for line in lines)


def test_the_package_sets_say_where_each_line_came_from() -> None:
    for path in sorted(Path(REPO / "docker" / "base-images").glob("*.txt")):
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert "  # [" in line, f"{path.name}: {line!r} does not say where it came from"
