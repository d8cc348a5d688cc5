"""What the release tests share: the runner images' package sets (docker/base-images/<tag>.txt) as the tests read
them, a throwaway Python environment holding stub .dist-info folders of one of them (for pip to resolve
requirements.txt against), and a copy of what a release publishes (manifests, code, requirements.txt)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from helpers import REPO
from packaging.utils import canonicalize_name

BASE_IMAGES = REPO / "docker" / "base-images"
HUB = "hub.dataloop.ai/dtlpy-runner-images/"
# What an image keeps on purpose and requirements.txt must never move: its CUDA build of torch (and the paired
# torchvision/torchaudio), Dataloop's pins of PyJWT, attrs and validators, and the agent's dtlpy.
KEPT = {canonicalize_name(n) for n in ("torch", "torchvision", "torchaudio", "PyJWT", "attrs", "validators", "dtlpy")}


def image_file(image: str) -> Path:
    """docker/base-images/<repository>_<tag>.txt of `hub.dataloop.ai/dtlpy-runner-images/<repository>:<tag>`."""
    assert image.startswith(HUB), f"{image} is not one of Dataloop's public runner images"
    return BASE_IMAGES / (image[len(HUB):].replace(":", "_") + ".txt")


def package_set(path: Path) -> dict[str, str]:
    """{canonical name: version} of a package-set file (`name==version  # where it came from` lines)."""
    packages = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, version = spec.split("==")
            packages[canonicalize_name(name)] = version
    return packages


def stub_environment(root: Path, packages: dict[str, str]) -> Path:
    """A venv without pip whose site-packages holds an empty .dist-info per package: pip sees them installed (name
    and version) and has no dependencies of theirs to check. Its python."""
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name, version in packages.items():
        dist_info = Path(site) / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (dist_info / "INSTALLER").write_text("stub\n")
        (dist_info / "RECORD").write_text("")
    return python


def pip_plan(python: Path, requirements: Path, report: Path) -> dict[str, str]:
    """{canonical name: version} of what `pip install -r requirements` would install into `python`'s environment
    (new packages and replaced ones alike), resolved from the package index without installing anything."""
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
                           "--disable-pip-version-check", "--report", str(report), "-r", str(requirements)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"pip could not resolve {requirements.name}:\n{done.stderr[-3000:]}"
    plan = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in plan}


def release_checkout(root: Path) -> Path:
    """A copy at `root` of what a release publishes: the manifests, the app's code, requirements.txt and the
    .gitignore dtlpy honours when it packs the folder."""
    shutil.copytree(REPO / "adapters", root / "adapters", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "pipeline_templates", root / "pipeline_templates")
    for name in ("dataloop.json", "requirements.txt", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    return root
