"""The Dataloop promotion gate guards the retention set too, through the real dtlpy client against the loopback
platform: a model that wins on the test items but forgot what the current model knew is kept out, the verdict on
the platform says why, and the pipeline's route is "kept"."""

from __future__ import annotations

import csv
from pathlib import Path

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, Progress, TrainedModel, TunedTwice, image_bytes
from loopback_platform import LoopbackPlatform, tag_subset_filter
from PIL import Image

from adapters.clip_finetune.dataloop.nodes import ClipNodes
from adapters.clip_finetune.dataloop.promotion import KEPT, METADATA_KEY, PROMOTED
from adapters.clip_finetune.retrieval import evaluation_result

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _rows(table: Path) -> list[tuple[Path, str]]:
    with table.open(newline="") as f:
        return [((table.parent / r["filepath"]).resolve(), r["caption"]) for r in csv.DictReader(f)]


def _model(platform: LoopbackPlatform, project: str, dataset: str, folder: Path, name: str) -> dl.Model:
    """A trained model entity whose artifacts are the saved model `folder` (as train_model uploads them)."""
    artifacts = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix != ".md"}
    entity = platform.add_model(project, name, QUICK_CONFIG, dataset, status="trained", artifacts=artifacts,
                                subsets={"train": tag_subset_filter("train")})
    return dl.models.get(model_id=entity["id"])


def test_the_gate_keeps_out_a_model_that_forgot_the_retention_items_and_records_why(
    platform: LoopbackPlatform, trained_model: TrainedModel, retention_tuned: TunedTwice, monkeypatch
) -> None:
    project = platform.add_project()["id"]
    dataset = platform.add_dataset(project, "two-domains")["id"]
    for tag, table in (("test", retention_tuned.test), ("retention", retention_tuned.retention)):
        for i, (path, caption) in enumerate(_rows(table)[:40]):
            platform.add_item(dataset, image_bytes(Image.open(path).convert("RGB")), f"/{tag}/{i:03d}.png",
                              description=caption, tags=[tag])
    current = _model(platform, project, dataset, trained_model.folder, "shapes-current")
    new = _model(platform, project, dataset, retention_tuned.plain, "patterns-new")
    progress, nodes = Progress(), ClipNodes()
    retention = tag_subset_filter("retention")["filter"]

    winner = nodes.promote_if_better(new, current, dl.datasets.get(dataset_id=dataset),
                                     filters=tag_subset_filter("test")["filter"],
                                     compare_config={"retention_filters": retention}, progress=progress)

    verdict = platform.models[new.id]["metadata"]["user"][METADATA_KEY]["promotion"]  # what reached the platform
    metric = verdict["metric"]
    assert verdict["new"][metric] > verdict["previous"][metric]  # it wins on the test items...
    kept = verdict["retention"]
    assert kept["new"][metric] < kept["previous"][metric] - kept["tolerance"]  # ...and forgot the shapes
    assert verdict["promoted"] is False and winner.id == current.id
    assert verdict["reason"].startswith(f"refused on retention: {metric} on the retention set fell from")
    assert "'shapes-current'" in verdict["reason"] and kept["filters"] == retention and kept["tolerance"] == 0.01
    assert progress.updates[-1]["action"] == KEPT and "refused on retention" in progress.updates[-1]["message"]

    # the same models with a tolerance that forgives the loss: the target decides, and the new model goes through;
    # and galleries of 10 images: the retention items are ranked 10 at a time, as training ranks them 1,000 at a time
    monkeypatch.setattr(evaluation_result, "GALLERY", 10)
    winner = nodes.promote_if_better(new, current, dl.datasets.get(dataset_id=dataset),
                                     filters=tag_subset_filter("test")["filter"],
                                     compare_config={"retention_filters": retention, "retention_tolerance": 1.0},
                                     progress=progress)
    assert winner.id == new.id and progress.updates[-1]["action"] == PROMOTED
    again = platform.models[new.id]["metadata"]["user"][METADATA_KEY]["promotion"]
    assert again["reason"] == "" and again["new"] == verdict["new"]  # the target items: one set, as before
    for model in ("new", "previous"):  # 40 retention items in 4 galleries: each caption ranked against 10 images
        assert again["retention"][model][metric] > kept[model][metric] + 0.1
