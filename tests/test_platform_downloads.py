"""The platform's failed downloads (tests/loopback_platform serves HTTP 500s and streams cut mid-file, as a real
server or proxy does): dtlpy's prepare_data logs them and leaves the item out of the download entirely (no file,
no JSON). The adapter counts them against the subset's items as skipped in data_report.json, and a subset whose
every download failed stops with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import QUICK_CONFIG, add_model, seed_shapes
from loopback_platform import LoopbackPlatform

from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.errors import ConfigError, DataError, ModelError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data_report(workdir: Path) -> dict:
    (report,) = workdir.rglob("output/data_report.json")
    return json.loads(report.read_text())


def test_failed_and_cut_downloads_are_counted_as_skipped(platform: LoopbackPlatform, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 24, "validation": 8})
    failing, cut = shapes.items["train"][:6], shapes.items["train"][6:12]
    for item in failing:
        platform.fail("GET", rf"^/items/{item['id']}/stream$", status=500, times=None)
    for item in cut:
        platform.truncate("GET", rf"^/items/{item['id']}/stream$", keep=0.5, times=None)
    model = add_model(platform, shapes, QUICK_CONFIG)
    adapter = ClipAdapter()
    adapter.train_model(model)

    train = _data_report(tmp_path)["train"]
    assert train["used"] == 12
    assert train["skipped"] == {"download failed": 12}  # 12 used + 12 skipped: the subset's 24 items
    assert set(train["examples"]["download failed"]) <= {i["id"] for i in failing + cut}
    assert adapter.data_reports["train"].skipped["download failed"] == 12
    uploaded = json.loads(platform.artifact_files(model.id)["data_report.json"])
    assert uploaded["train"]["skipped"] == {"download failed": 12}


def test_every_training_download_failing_is_one_clear_error(platform: LoopbackPlatform, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 6, "validation": 4})
    for item in shapes.items["train"]:
        platform.fail("GET", rf"^/items/{item['id']}/stream$", status=500, times=None)
    model = add_model(platform, shapes, QUICK_CONFIG)
    with pytest.raises(DataError, match=r"subset 'train': every download failed \(6 items selected, none downloaded"):
        ClipAdapter().train_model(model)
    assert platform.artifacts(model.id) == []


def test_a_model_without_trained_artifacts_does_not_embed_with_the_base_weights(
        platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dtlpy as dl

    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 2})
    created = platform.add_model(shapes.project["id"], "clip-untrained", QUICK_CONFIG, shapes.dataset["id"],
                                 status="created")
    adapter = ClipAdapter(dl.models.get(model_id=created["id"]))
    with pytest.raises(ModelError, match=r"'clip-untrained' \(status 'created'\) has no trained weights"):
        adapter.embed_items([dl.items.get(item_id=i["id"]) for i in shapes.items["train"]])
    assert platform.feature_vectors == {}  # nothing reached the feature set

    shipped = add_model(platform, shapes, QUICK_CONFIG)  # status 'pre-trained': the base weights are the model
    items, vectors = ClipAdapter(shipped).embed_items([dl.items.get(item_id=i["id"]) for i in shapes.items["train"]])
    assert len(items) == 2 and len(platform.feature_vectors) == 2


@pytest.mark.parametrize("configuration", [[1, 2], "num_epochs=3"])
def test_a_model_configuration_that_is_not_an_object_is_a_clear_error(
        platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configuration: object) -> None:
    import dtlpy as dl

    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 2})
    created = platform.add_model(shapes.project["id"], "clip-listed", None, shapes.dataset["id"])
    platform.models[created["id"]]["configuration"] = configuration
    with pytest.raises(ConfigError, match=rf"its configuration is a JSON {type(configuration).__name__}, not an "
                                          "object of hyperparameters"):
        ClipAdapter(dl.models.get(model_id=created["id"]))
