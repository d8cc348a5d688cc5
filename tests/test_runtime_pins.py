"""The runtime the manifest names: the Dockerfile's pins, requirements.txt and pyproject.toml agree, and every
service runs the image the Dockerfile builds. (No Docker daemon here: docs/dataloop.md says what was not built.)"""

from __future__ import annotations

import json
import re

import pytest
import tomllib
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILE = (REPO / "Dockerfile").read_text()
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
MANIFEST = json.loads((REPO / "dataloop.json").read_text())
PINS = {canonicalize_name(n): v for n, v in re.findall(r"^\s+([A-Za-z0-9_.\-]+)==([^\s\\]+)", DOCKERFILE, re.M)}
RUNTIME = [Requirement(r) for r in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["multilingual"]]]


@pytest.mark.parametrize("requirement", RUNTIME, ids=str)
def test_every_runtime_dependency_is_pinned_in_the_image_within_its_floor(requirement: Requirement) -> None:
    name = canonicalize_name(requirement.name)
    assert name in PINS, f"the Dockerfile does not pin {requirement.name}"
    assert requirement.specifier.contains(PINS[name]), f"{name}=={PINS[name]} is outside {requirement}"


def test_the_image_pins_torch_torchvision_open_clip_and_dtlpy() -> None:
    assert {"torch", "torchvision", "open-clip-torch", "dtlpy"} <= set(PINS)


def test_requirements_txt_adds_only_this_package() -> None:
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == ["."]


def test_every_service_runs_the_image_the_dockerfile_builds() -> None:
    images = {c["runtime"]["runnerImage"] for c in MANIFEST["components"]["computeConfigs"]}
    (image,) = images
    assert image.endswith(f":{MANIFEST['version']}")  # the image is versioned with the app
    assert f"docker build -t {image} ." in DOCKERFILE
    assert re.search(r"^ARG BAKE_WEIGHTS=0$", DOCKERFILE, re.M)
