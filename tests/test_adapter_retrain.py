"""A model entity trained (again) after an adapter loaded it: nothing that came from its old weights survives.
An adapter that had loaded it reloads before evaluating, its old vectors are not kept as "already embedded", and
the run state is uploaded beside training instead of stalling it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dtlpy as dl
import numpy as np
import pytest
from helpers import QUICK_CONFIG, Shapes, add_model, seed_shapes
from loopback_platform import LoopbackPlatform, dtlpy_pointed_at, tag_subset_filter

from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.dataloop.artifacts import RunStateSync
from adapters.clip_finetune.training import CHECKPOINT_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIG = {**QUICK_CONFIG, "num_epochs": 2, "early_stopping": False}


@dataclass
class Retrained:
    platform: LoopbackPlatform
    shapes: Shapes
    model: dl.Model
    before: ClipAdapter  # loaded the model and embedded with it before the second training
    old_vectors: dict[str, list[float]]
    old_metrics: dict[str, float]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Retrained]:
    """A model embedded and evaluated by one adapter, then trained by another (a model trained twice is the
    same case: its weights change after an adapter loaded them)."""
    with LoopbackPlatform() as platform, pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("retrain"))
        with dtlpy_pointed_at(platform):
            shapes = seed_shapes(platform, {"train": 64, "validation": 16, "test": 16})
            model = add_model(platform, shapes, CONFIG)
            before = ClipAdapter(model_entity=model)
            items, old = before.embed_items(_test_items(shapes))
            dataset = dl.datasets.get(dataset_id=shapes.dataset["id"])
            before.evaluate_model(model, dataset, filters=tag_subset_filter("test"))
            old_metrics = dict(before.evaluation)
            ClipAdapter().train_model(dl.models.get(model_id=model.id))
            yield Retrained(platform, shapes, dl.models.get(model_id=model.id), before,
                            {i.id: v for i, v in zip(items, old, strict=True)}, old_metrics)


@pytest.fixture
def shared(retrained: Retrained) -> Iterator[Retrained]:
    with dtlpy_pointed_at(retrained.platform):
        yield retrained


def _test_items(shapes: Shapes) -> list[dl.Item]:
    return [dl.items.get(item_id=i["id"]) for i in shapes.items["test"]]


def test_evaluate_model_reloads_a_model_trained_again_since_it_was_loaded(shared: Retrained) -> None:
    dataset = dl.datasets.get(dataset_id=shared.shapes.dataset["id"])
    shared.before.evaluate_model(shared.model, dataset, filters=tag_subset_filter("test"))
    fresh = ClipAdapter()
    fresh.evaluate_model(shared.model, dataset, filters=tag_subset_filter("test"))
    assert shared.before.evaluation == pytest.approx(fresh.evaluation, abs=1e-6)
    assert shared.before.evaluation != pytest.approx(shared.old_metrics, abs=1e-6)  # the weights did change


def test_vectors_of_the_old_weights_are_not_kept_after_training_again(shared: Retrained) -> None:
    adapter = ClipAdapter(model_entity=shared.model)
    items, vectors = adapter.embed_items(_test_items(shared.shapes))
    (feature_set,) = shared.platform.model_feature_sets(shared.model.id)
    stored = {v["entityId"]: v["value"] for v in shared.platform.vectors(feature_set["id"])}
    assert len(stored) == len(items) == len(shared.old_vectors)
    for item, vector in zip(items, vectors, strict=True):
        np.testing.assert_allclose(stored[item.id], vector, atol=1e-6)  # the new weights' vectors
        assert not np.allclose(stored[item.id], shared.old_vectors[item.id], atol=1e-4)


class BlockingArtifacts:
    """model.artifacts whose upload waits until released: a slow network."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.uploaded: list[str] = []

    def upload(self, filepath: str, overwrite: bool = True) -> None:
        assert self.release.wait(30), "never released"
        self.uploaded.append(Path(filepath).name)


def test_the_run_state_is_uploaded_beside_training_not_on_its_thread(tmp_path: Path) -> None:
    model = type("Model", (), {"artifacts": BlockingArtifacts(), "name": "m", "id": "m"})()
    sync = RunStateSync(model)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"epoch 1")

    returned = threading.Event()
    caller = threading.Thread(target=lambda: (sync.upload(tmp_path / CHECKPOINT_NAME), returned.set()))
    caller.start()
    assert returned.wait(5), "upload() waited for the network: every epoch would stall as long"
    # two more epochs while the first upload hangs: the newest state replaces the one still waiting
    for epoch in (2, 3):
        (tmp_path / f"{CHECKPOINT_NAME}.tmp").write_bytes(f"epoch {epoch}".encode())
        (tmp_path / f"{CHECKPOINT_NAME}.tmp").replace(tmp_path / CHECKPOINT_NAME)  # atomic, as training writes
        sync.upload(tmp_path / CHECKPOINT_NAME)
    model.artifacts.release.set()
    sync.finish()
    assert model.artifacts.uploaded == [CHECKPOINT_NAME, CHECKPOINT_NAME]  # epoch 1, then epoch 3 (2 skipped)
