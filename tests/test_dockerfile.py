"""The optional Dockerfile follows Dataloop's three rules for images built on their runner images (no USER,
${DL_PYTHON_EXECUTABLE} -m pip, no ENV HOME=/tmp), builds FROM the public image the manifest names for training,
and keeps that image's torch and dtlpy: it installs requirements.txt and nothing else.
(No Docker daemon here: the image is not built by the tests; docs/dataloop.md says so.)"""

from __future__ import annotations

import json
import re

from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from release_support import HUB, KEPT

DOCKERFILE = (REPO / "Dockerfile").read_text()
MANIFEST = json.loads((REPO / "dataloop.json").read_text())
# instructions, comments dropped and continuation lines joined
INSTRUCTIONS = [line.strip() for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def _pip_installs() -> list[str]:
    """Every pip install command line in the Dockerfile, heredocs included."""
    return [line for line in INSTRUCTIONS if re.search(r"\bpip3?\b.*\binstall\b", line)]


def test_no_user_instruction() -> None:
    assert not [line for line in INSTRUCTIONS if re.match(r"USER\b", line, re.I)]


def test_home_is_left_to_the_base_image() -> None:
    assert not [line for line in INSTRUCTIONS if re.match(r"ENV\b", line, re.I) and re.search(r"\bHOME\s*=", line)]


def test_pip_runs_as_dl_python_executable_minus_m_pip() -> None:
    installs = _pip_installs()
    assert installs, "the Dockerfile installs nothing"
    for line in installs:
        assert re.search(r"\$\{?DL_PYTHON_EXECUTABLE\}? -m pip install", line), line


def test_builds_from_the_public_gpu_image_the_manifest_trains_on() -> None:
    (base,) = [line.split()[1] for line in INSTRUCTIONS if line.upper().startswith("FROM ")]
    train = next(c for c in MANIFEST["components"]["computeConfigs"] if c["runtime"]["podType"].startswith("gpu"))
    assert base == train["runtime"]["runnerImage"] and base.startswith(HUB + "gpu:")


def test_installs_requirements_txt_and_no_torch_or_dtlpy_of_its_own() -> None:
    installs = _pip_installs()
    assert any(re.search(r"-r \S*requirements\.txt", line) for line in installs)
    for line in installs:
        words = [w.strip("'\"") for w in line.split("install", 1)[1].split() if not w.startswith(("-", "/"))]
        named = {canonicalize_name(Requirement(w).name) for w in words if re.match(r"[A-Za-z]", w)}
        assert not named & KEPT, f"the Dockerfile installs {named & KEPT} over the base image's: {line}"


def test_weights_can_be_baked_and_are_not_by_default() -> None:
    assert re.search(r"^ARG BAKE_WEIGHTS=0$", DOCKERFILE, re.M)
    assert "open_clip.create_model_and_transforms" in DOCKERFILE
