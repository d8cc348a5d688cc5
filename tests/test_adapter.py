"""ClipAdapter through the real dtlpy client against the loopback platform: each test asserts what reached the
platform (model status, artifacts, metrics, feature sets, vectors, PATCH bodies), not only that code ran.

One model is trained once per module (`trained`) on synthetic shapes and shared by the tests that only read it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dtlpy as dl
import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
from helpers import (
    QUICK_CONFIG,
    Progress,
    Shapes,
    add_model,
    image_bytes,
    published,
    rig_validation,
    seed_shapes,
)
from loopback_platform import LoopbackPlatform, dtlpy_pointed_at, tag_subset_filter

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.dataloop import read_subset
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.dataloop.configuration import DTLPY_CONFIG_KEYS
from adapters.clip_finetune.errors import ConfigError, DataError, ModelError
from adapters.clip_finetune.model.clip import ClipModel
from adapters.clip_finetune.retrieval.evaluate import evaluate

EMBED_DIM = 64  # clip-tiny.json's embed_dim; dtlpy's default embeddings_size is 256
# From-scratch training of the tiny model (measured: held-out text->image MRR ~0.05 -> ~0.2 in ~25 s on 1 thread).
TRAIN_CONFIG: dict[str, Any] = {**QUICK_CONFIG, "num_epochs": 8, "train_batch_size": 32}
SIZES = {"train": 256, "validation": 64, "test": 100, "retention": 32}  # retention: the model's 'retention' subset
ARTIFACTS = {"open_clip_model.safetensors", "open_clip_config.json", "finetune_config.json", "metrics.json"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------- shared runs

@dataclass
class Trained:
    platform: LoopbackPlatform
    shapes: Shapes
    model_id: str
    adapter: ClipAdapter
    progress: Progress
    workdir: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """One train_model run on 256/64 synthetic image items, shared by the tests that only read its results."""
    workdir = tmp_path_factory.mktemp("trained")
    with LoopbackPlatform() as platform, pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)  # train_model downloads under ./tmp/<model id>/
        with dtlpy_pointed_at(platform):
            shapes = seed_shapes(platform, SIZES)
            model = add_model(platform, shapes, TRAIN_CONFIG, more_subsets=("retention",))
            adapter, progress = ClipAdapter(), Progress()
            adapter.train_model(model, progress=progress)
        yield Trained(platform, shapes, model.id, adapter, progress, workdir)


@pytest.fixture
def shared(trained: Trained) -> Iterator[Trained]:
    """`trained`, with dtlpy pointed at its platform for this test (other tests point it elsewhere)."""
    with dtlpy_pointed_at(trained.platform):
        yield trained


def download_artifacts(platform: LoopbackPlatform, model_id: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in platform.artifact_files(model_id).items():
        (folder / name).write_bytes(data)
    return folder


def stock_open_clip(folder: Path) -> ClipModel:
    """The artifact as stock open_clip loads it, wrapped for the core's evaluate()."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    return ClipModel(model, preprocess, preprocess, open_clip.get_tokenizer(f"local-dir:{folder}"), cfg, str(folder))


# ------------------------------------------------------------------------------------------------ train
def test_train_model_uploads_the_best_epoch_as_a_stock_open_clip_model(shared: Trained, tmp_path: Path) -> None:
    platform, model_id = shared.platform, shared.model_id

    assert platform.model_statuses(model_id) == ["pre-trained", "training", "trained"]
    assert ARTIFACTS <= set(platform.artifact_files(model_id))
    folder = download_artifacts(platform, model_id, tmp_path / "artifact")
    metrics = json.loads((folder / "metrics.json").read_text())
    clip = stock_open_clip(folder)
    assert clip.embed_dim == EMBED_DIM

    # The uploaded weights score exactly what the best epoch scored on validation when it was picked.
    downloaded = shared.workdir / "tmp" / model_id / "datasets" / shared.shapes.dataset["id"]
    validation = read_subset(downloaded / "validation")
    rescored = evaluate(clip, validation, batch_size=64, num_workers=0)
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert metrics["best_epoch"] >= 1 and len(validation) == SIZES["validation"]
    assert rescored[metrics["metric"]] == pytest.approx(best[metrics["metric"]], abs=1e-6)
    assert rescored == pytest.approx(metrics["after"], abs=1e-6)


def test_a_retention_subset_on_the_model_is_scored_before_and_after_and_never_trained_on(shared: Trained) -> None:
    metrics = json.loads(shared.platform.artifact_files(shared.model_id)["metrics.json"])
    downloaded = shared.workdir / "tmp" / shared.model_id / "datasets" / shared.shapes.dataset["id"]
    retention = read_subset(downloaded / "retention")  # dtlpy downloaded the subset the model names
    assert {p.item_id for p in retention} == {i["id"] for i in shared.shapes.items["retention"]}
    assert not {p.item_id for p in retention} & {p.item_id for p in read_subset(downloaded / "train")}
    before, after = metrics["retention"]["before"], metrics["retention"]["after"]
    assert {"text_to_image/recall@5", "image_to_text/mrr"} <= before.keys() & after.keys()
    # from a random init (QUICK_CONFIG) the shapes are learnt, so held-out shapes rank better; no auto WiSE-FT
    assert after["text_to_image/mrr"] > before["text_to_image/mrr"] and metrics["wise_ft_curve"] == []
    assert not any("no retention set" in n for n in metrics["notes"])


def test_train_model_publishes_loss_learning_rate_and_validation_recall_per_epoch(shared: Trained) -> None:
    platform, model_id = shared.platform, shared.model_id
    history = json.loads(platform.artifact_files(model_id)["metrics.json"])["history"]
    epochs = [h["epoch"] for h in history]

    loss = published(platform, model_id, "loss")["train"]
    assert loss == pytest.approx({h["epoch"]: h["train_loss"] for h in history})
    assert sorted(published(platform, model_id, "learning rate")["lr"]) == epochs
    recall = published(platform, model_id, "validation text_to_image")["recall@1"]
    assert sorted(recall) == [0, *epochs]  # epoch 0: the base model
    assert {e: recall[e] for e in epochs} == pytest.approx({h["epoch"]: h["text_to_image/recall@1"] for h in history})
    assert {s["datasetId"] for s in platform.metrics(model_id)} == {shared.shapes.dataset["id"]}
    # dtlpy's on_epoch_end_callback turns our (epoch - 1, n_epochs) into a percentage
    percents = [u["progress"] for u in shared.progress.updates if "finished epoch" in str(u.get("message"))]
    assert percents == [int(100 * e / TRAIN_CONFIG["num_epochs"]) for e in epochs]


def test_no_hyperparameter_default_is_written_to_the_model_configuration(shared: Trained) -> None:
    platform, model_id = shared.platform, shared.model_id
    patches = platform.calls_to("PATCH", rf"^/ml/models/{model_id}$")
    written = set().union(*(set((c.json or {}).get("configuration", {})) for c in patches))

    # Only dtlpy's own keys, plus the two dtlpy reads for embedding, set once from the model we loaded.
    assert written - set(TRAIN_CONFIG) <= DTLPY_CONFIG_KEYS | {"embeddings_size", "batch_size"}
    config = platform.model(model_id)["configuration"]
    assert {k: config[k] for k in TRAIN_CONFIG} == TRAIN_CONFIG
    assert (config["embeddings_size"], config["batch_size"]) == (EMBED_DIM, build_config(TRAIN_CONFIG).batch_size)
    assert not {"learning_rate", "epsilon", "weight_decay", "warmup", "seed"} & (written - set(TRAIN_CONFIG))


def test_training_beats_the_base_model_on_held_out_items(shared: Trained, capsys: pytest.CaptureFixture) -> None:
    platform, shapes = shared.platform, shared.shapes
    dataset = dl.datasets.get(dataset_id=shapes.dataset["id"])
    base = add_model(platform, shapes, TRAIN_CONFIG)

    ClipAdapter().evaluate_model(base, dataset, filters=tag_subset_filter("test"))
    ClipAdapter().evaluate_model(dl.models.get(model_id=shared.model_id), dataset, filters=tag_subset_filter("test"))

    def score(model_id: str, figure: str, x: int) -> float:
        return published(platform, model_id, f"evaluation text_to_image {figure}")["shapes"][x]

    before = {"mrr": score(base.id, "mrr", 0), "R@5": score(base.id, "recall@k", 5)}
    after = {"mrr": score(shared.model_id, "mrr", 0), "R@5": score(shared.model_id, "recall@k", 5)}
    with capsys.disabled():
        print(f"\nheld-out text->image ({SIZES['test']} images): base {before}, trained {after}")
    assert after["mrr"] > 2 * before["mrr"] and after["mrr"] - before["mrr"] > 0.08
    assert after["R@5"] - before["R@5"] > 0.15
    assert platform.calls_to("POST", r"^/datasets/[^/]+/export$")  # items came with their captions (JSON)
    assert platform.calls_to("POST", r"/annotations$") == []  # no dtlpy predict step: nothing annotated


def test_evaluate_model_keeps_dtlpys_function_declaration() -> None:
    assert ClipAdapter.evaluate_model.__dtlpy__ == dl.BaseModelAdapter.evaluate_model.__dtlpy__


# ------------------------------------------------------------------------------------------------ embed
def test_embed_dataset_uploads_one_unit_vector_of_the_model_size_per_image(shared: Trained) -> None:
    platform, shapes = shared.platform, shared.shapes
    adapter = ClipAdapter(model_entity=dl.models.get(model_id=shared.model_id))  # downloads the artifacts

    adapter.embed_dataset(dl.datasets.get(dataset_id=shapes.dataset["id"]), filters=tag_subset_filter("validation"))

    (feature_set,) = platform.model_feature_sets(shared.model_id)
    assert feature_set["size"] == EMBED_DIM
    vectors = [v for v in platform.vectors(feature_set["id"]) if v["datasetId"] == shapes.dataset["id"]]
    assert sorted(v["entityId"] for v in vectors) == sorted(i["id"] for i in shapes.items["validation"])
    norms = np.linalg.norm(np.array([v["value"] for v in vectors]), axis=1)
    assert norms == pytest.approx(np.ones(len(vectors)), abs=1e-5)
    # the same vectors the trained model in memory gives the same image
    first = next(v for v in vectors if v["entityId"] == shapes.items["validation"][0]["id"])
    expected = shared.adapter.embed([shared.adapter.prepare_item_func(dl.items.get(item_id=first["entityId"]))])[0]
    assert first["value"] == pytest.approx(expected, abs=1e-5)


def test_undecodable_items_are_skipped_and_counted_the_rest_embedded(shared: Trained) -> None:
    platform, shapes = shared.platform, shared.shapes
    dataset_id = platform.add_dataset(shapes.project["id"], f"mixed-{uuid.uuid4().hex[:6]}")["id"]
    images = [platform.add_item(dataset_id, image_bytes(render(s)), f"/ok/{i}.png")
              for i, s in enumerate(sample_specs(3, 9))]
    broken = platform.add_item(dataset_id, b"this is text, not a JPEG", "/bad/photo.jpg")
    text = platform.add_item(dataset_id, b"a small red circle on the left", "/texts/query.txt")
    prompt = platform.add_prompt_item(dataset_id, "/prompts/p.json", [{"image": platform.stream_url(images[0]["id"])}])
    adapter = ClipAdapter(model_entity=dl.models.get(model_id=shared.model_id))
    items = [dl.items.get(item_id=i["id"]) for i in (*images, broken, text, prompt)]

    returned, vectors = adapter.embed_items(items)

    (feature_set,) = platform.model_feature_sets(shared.model_id)
    uploaded = {v["entityId"]: v["value"] for v in platform.vectors(feature_set["id"]) if v["datasetId"] == dataset_id}
    # prompt items are embedded (their image) but dtlpy uploads them only with upload_features set
    assert set(uploaded) == {i["id"] for i in (*images, text)}
    assert [i.id for i in returned] == [i["id"] for i in (*images, text, prompt)]
    assert vectors[-1] == pytest.approx(uploaded[images[0]["id"]], abs=1e-6)
    assert all(type(x) is float for v in vectors for x in v) and {len(v) for v in vectors} == {EMBED_DIM}
    assert adapter.embed_report.skipped == {"undecodable image": 1}
    assert adapter.embed_report.examples["undecodable image"] == [broken["id"]]


def test_the_uploaded_weights_are_the_best_epochs_not_the_last(
    platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 16, "validation": 8})
    config = {**QUICK_CONFIG, "num_epochs": 3, "early_stopping_epochs": 2}
    model = add_model(platform, shapes, config)
    states = rig_validation(monkeypatch, best_call=2)  # validation calls: 0 = base, 1..3 = epochs

    ClipAdapter().train_model(model)

    uploaded = safetensors.torch.load(platform.artifact_files(model.id)["open_clip_model.safetensors"])
    assert json.loads(platform.artifact_files(model.id)["metrics.json"])["best_epoch"] == 2
    assert all(torch.equal(uploaded[k], v) for k, v in states[2].items())
    assert not all(torch.equal(uploaded[k], v) for k, v in states[3].items())  # the last epoch's differ


# ----------------------------------------------------------------------------------- prompt-item training
def test_prompt_items_train_with_their_images_fetched_by_id_in_parallel(
    platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    project = platform.add_project()
    dataset = platform.add_dataset(project["id"], "prompts")
    image_ids = []
    for i, spec in enumerate(sample_specs(48, seed=3)):
        image = platform.add_item(dataset["id"], image_bytes(render(spec)), f"/images/{i:03d}.png")  # untagged
        image_ids.append(image["id"])
        prompt = {"image": platform.stream_url(image["id"]), "caption": spec.caption}
        split = "train" if i < 36 else "validation"
        platform.add_prompt_item(dataset["id"], f"/prompts/{i:03d}.json", [prompt], tags=[split])
    uncaptioned = platform.add_prompt_item(dataset["id"], "/prompts/uncaptioned.json",
                                           [{"image": platform.stream_url(image_ids[0])}], tags=["train"])
    model = add_model(platform, Shapes(project, dataset, {}), QUICK_CONFIG)
    in_flight, peak = track_concurrency(platform, rf"^/items/({'|'.join(image_ids)})/stream$", seconds=0.05)

    ClipAdapter().train_model(model)

    assert platform.model(model.id)["status"] == "trained"
    streamed = {c.path.split("/")[2] for c in platform.calls_to("GET", r"^/items/[^/]+/stream$")}
    assert set(image_ids) <= streamed  # every referenced image fetched by id
    assert peak() > 1 and in_flight() == 0  # ...several at a time
    report = json.loads(platform.artifact_files(model.id)["data_report.json"])
    assert report["train"]["used"] == 36 and report["validation"]["used"] == 12
    assert report["train"]["skipped"] == {"no free-text annotation": 1}
    assert report["train"]["examples"]["no free-text annotation"] == [f"{uncaptioned['id']}#1"]


def track_concurrency(platform: LoopbackPlatform, path_regex: str, seconds: float) -> tuple[Any, Any]:
    """Hold matching requests `seconds` each (outside the stand-in's lock) and count how many overlap."""
    import re

    rx, lock, state = re.compile(path_regex), threading.Lock(), {"now": 0, "peak": 0}
    dispatch = platform._dispatch

    def tracked(method: str, raw_path: str, headers: dict[str, str], body: bytes) -> Any:
        if not rx.search(raw_path.split("?")[0].removeprefix("/api/v1")):
            return dispatch(method, raw_path, headers, body)
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        try:
            time.sleep(seconds)
            return dispatch(method, raw_path, headers, body)
        finally:
            with lock:
                state["now"] -= 1

    platform._dispatch = tracked  # type: ignore[method-assign]
    return (lambda: state["now"]), (lambda: state["peak"])


# --------------------------------------------------------------------------------------- failures, checks
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"episilon": 1e-8}, ["episilon: unknown key; did you mean 'epsilon'?"]),
        ({"num_epochs": 0}, ["num_epochs: Input should be greater than or equal to 1"]),
        ({"device": "banana"}, ["device: unknown torch device"]),  # not a torch RuntimeError at load time
        ({"num_epochs": True}, ["num_epochs: expected a number, not true/false"]),  # not one epoch
    ],
)
def test_a_bad_configuration_is_rejected_with_the_field_named_before_any_download(
    platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: dict, expected: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 2, "validation": 2})
    model = add_model(platform, shapes, {**QUICK_CONFIG, **override})

    with pytest.raises(ConfigError) as raised:
        ClipAdapter().train_model(model)

    assert all(text in str(raised.value) for text in expected), str(raised.value)
    assert model.name in str(raised.value)
    assert platform.calls_to("POST", r"/export$") == [] and platform.calls_to("GET", r"/stream$") == []
    assert platform.model(model.id)["status"] != "trained" and platform.artifacts(model.id) == []


def test_embeddings_size_follows_the_architecture_and_is_written_before_the_feature_set(
    platform: LoopbackPlatform, caplog: pytest.LogCaptureFixture
) -> None:
    """Create New Model merges a pipeline's "Model config" over the base model's configuration: a new model_name
    keeps the base's embeddings_size (512 for ViT-B-32). The size is derived from the architecture, written to
    the model before dtlpy creates the feature set with it, and the change is logged."""
    shapes = seed_shapes(platform, {"train": 3})
    model = add_model(platform, shapes, {**QUICK_CONFIG, "embeddings_size": 512})

    with caplog.at_level("WARNING"):
        adapter = ClipAdapter(model_entity=model)
    assert platform.model(model.id)["configuration"]["embeddings_size"] == EMBED_DIM
    assert "embeddings_size 512 in its configuration does not match" in caplog.text

    items = [dl.items.get(item_id=i["id"]) for i in shapes.items["train"]]
    adapter.embed_items(items)
    (feature_set,) = platform.model_feature_sets(model.id)
    assert feature_set["size"] == EMBED_DIM and len(platform.vectors(feature_set["id"])) == 3


def test_a_subset_without_captions_fails_before_training_naming_it_and_the_counts(
    platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 8})
    for i, spec in enumerate(sample_specs(5, seed=1)):
        platform.add_item(shapes.dataset["id"], image_bytes(render(spec)), f"/validation/{i}.png", tags=["validation"])
    model = add_model(platform, shapes, QUICK_CONFIG)

    with pytest.raises(DataError, match=r"validation: 5 items, 0 pairs used, 5 skipped: 5 no caption"):
        ClipAdapter().train_model(model)

    assert platform.metrics(model.id) == [] and platform.artifacts(model.id) == []  # no epoch ran, nothing uploaded
    assert platform.model(model.id)["status"] == "training"  # dtlpy leaves it there on an exception


def test_a_failed_artifact_upload_fails_train_model_instead_of_ending_trained_without_weights(
    platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 16, "validation": 8})
    model = add_model(platform, shapes, QUICK_CONFIG)
    binaries = platform.binaries_dataset(shapes.project["id"])["id"]
    platform.fail("POST", rf"^/datasets/{binaries}/items$", status=500, times=None)

    with pytest.raises(ModelError, match=r"open_clip_model\.safetensors, open_clip_config\.json did not reach"):
        ClipAdapter().train_model(model)

    assert platform.model(model.id)["status"] != "trained" and platform.artifacts(model.id) == []
