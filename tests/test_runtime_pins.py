"""The runtime the manifest names agrees with pyproject.toml: each runtime dependency's floor is met either by the
version requirements.txt pins or, for what requirements.txt leaves to the image (torch, numpy, dtlpy, ...), by the
version every runner image holds (docker/base-images/). tests/test_base_image_install.py checks that pip resolves
requirements.txt on those images; tests/test_dockerfile.py, the optional image."""

from __future__ import annotations

import json

import pytest
import tomllib
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from release_support import image_file, package_set

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
MANIFEST = json.loads((REPO / "dataloop.json").read_text())
RUNTIME = [Requirement(r) for r in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["multilingual"]]]
LINES = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
PINS = {canonicalize_name(r.name): str(r.specifier)[2:] for r in map(Requirement, filter(None, LINES))}
IMAGES = sorted({c["runtime"]["runnerImage"] for c in [*MANIFEST["components"]["computeConfigs"],
                                                        *MANIFEST["components"].get("services", [])]})


def test_requirements_txt_pins_every_line() -> None:
    for line in filter(None, LINES):
        assert str(Requirement(line).specifier).startswith("=="), f"requirements.txt: {line} is not pinned"


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("requirement", RUNTIME, ids=str)
def test_every_runtime_dependency_meets_its_floor_on_every_image(requirement: Requirement, image: str) -> None:
    name = canonicalize_name(requirement.name)
    version = PINS.get(name) or package_set(image_file(image)).get(name)
    assert version, f"{requirement.name} is neither pinned in requirements.txt nor in {image}"
    assert requirement.specifier.contains(version), f"{name}=={version} is outside {requirement} ({image})"


def test_what_requirements_txt_pins_is_not_already_in_an_image() -> None:
    for image in IMAGES:
        assert not set(PINS) & set(package_set(image_file(image))), f"requirements.txt re-pins a package of {image}"
