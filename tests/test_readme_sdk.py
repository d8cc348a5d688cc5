"""The README's Dataloop SDK example, run as written through the real dtlpy client against the loopback platform.

The platform holds what the example names: a project "My project", a dataset "captions" with items tagged
train/validation, and the app installed with its model entity "openclip-vit-b-32" (here configured with the tiny
architecture: these machines cannot download the ViT-B-32 weights). model.train() runs the app's train_model on a
background thread, as the platform's model management does, and answers at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from helpers import QUICK_CONFIG, REPO, seed_shapes
from loopback_platform import LoopbackPlatform

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_sdk_example() -> str:
    """The python block of the README's "Dataloop app" section."""
    section = (REPO / "README.md").read_text().split("## Dataloop app", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_readme_sdk_example_trains_embeds_and_searches(platform: LoopbackPlatform, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # train_model downloads under ./tmp/
    shapes = seed_shapes(platform, {"train": 24, "validation": 8})
    platform.projects[shapes.project["id"]]["name"] = "My project"
    platform.datasets[shapes.dataset["id"]]["name"] = "captions"
    manifest = json.loads((REPO / "dataloop.json").read_text())
    for model in manifest["components"]["models"]:
        model["configuration"] = {**QUICK_CONFIG}  # the example's own configuration merges over this
    platform.install_app(shapes.project["id"], manifest, REPO)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_sdk_example(), "README.md", "exec"), {})

    (tuned,) = [m for m in platform.models.values() if m["name"] == "clip-tuned-v1"]
    assert platform.model_statuses(tuned["id"])[-1] == "trained"
    assert tuned["configuration"]["num_epochs"] == 3 and "open_clip_model.safetensors" in platform.artifact_files(
        tuned["id"])
    (feature_set,) = platform.model_feature_sets(tuned["id"])
    items = platform.dataset_items(shapes.dataset["id"])
    assert {v["entityId"] for v in platform.vectors(feature_set["id"])} == {i["id"] for i in items}
    names = printed.getvalue().split()
    assert len(names) == 5 and set(names) <= {i["name"] for i in items}
    assert platform.unhandled == []
