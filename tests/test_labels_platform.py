"""On the platform (the real dtlpy client against the loopback stand-in): a dataset of labelled images with no
descriptions (class and box annotations, hierarchical labels) trains through train_model with template captions;
a `test` subset is downloaded, guarded against overlap with train, scored once and reported as the 'after'."""

from __future__ import annotations

import json
import uuid

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, image_bytes
from loopback_platform import tag_subset_filter

from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.dataloop.adapter import ClipAdapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_labelled_items_train_on_the_platform_and_the_test_subset_is_the_after_figure(platform, tmp_path,
                                                                                       monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # train_model downloads under ./tmp/<model id>/
    project = platform.add_project()
    dataset = platform.add_dataset(project["id"], "labelled")
    specs = sample_specs(96, seed=31)
    items = {}
    for i, spec in enumerate(specs):
        split = "train" if i < 64 else "validation" if i < 80 else "test"
        kind = "class" if i % 2 else "box"  # classification and detection labels alike
        ann = {"type": kind, "label": f"colours.{spec.attributes['colour']}", "coordinates": []}
        items[i] = platform.add_item(dataset["id"], image_bytes(render(spec)), f"/{split}/{i:03d}.png",
                                     annotations=[ann], tags=[split])
    # an item tagged both train and test: it must not score the model
    platform.add_item(dataset["id"], image_bytes(render(specs[0])), "/both.png", tags=["train", "test"],
                      annotations=[{"type": "class", "label": "colours.red", "coordinates": []}])
    subsets = {s: tag_subset_filter(s) for s in ("train", "validation", "test")}
    model = platform.add_model(project["id"], f"clip-{uuid.uuid4().hex[:8]}", {**QUICK_CONFIG, "num_epochs": 2},
                               dataset["id"], subsets=subsets)

    ClipAdapter().train_model(dl.models.get(model_id=model["id"]))

    assert platform.model(model["id"])["status"] == "trained"
    files = platform.artifact_files(model["id"])
    report = json.loads(files["data_report.json"])
    assert report["train"]["used"] == 65 and report["validation"]["used"] == 16
    assert report["test"]["used"] == 16 and report["test"]["skipped"] == {"also in train (item id)": 1}
    metrics = json.loads(files["metrics.json"])
    assert metrics["scored_on"] == "test" and metrics["after"] == metrics["test"]["after"]
    assert "zero_shot/top1_accuracy" in metrics["before"] and "zero_shot/top1_accuracy" in metrics["after"]
    assert "zero_shot/top1_accuracy" in metrics["selection"]["after"]
    classes = {k.rsplit("/", 1)[1] for k in metrics["after"] if k.startswith("zero_shot/accuracy/")}
    assert classes and all("." not in c for c in classes)  # the leaf of colours.<colour>
