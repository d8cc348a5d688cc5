"""The scale options from the Dataloop adapter's configuration, checked by what reached the platform: a train_model
run on 2 processes (gloo on CPU) with a locked image tower, accumulation, WiSE-FT and ONNX export; and a model with
a Hugging Face text tower trained, uploaded and loaded back from the platform to embed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dtlpy as dl
import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import QUICK_CONFIG, add_model, published, rig_validation, seed_shapes
from loopback_platform import LoopbackPlatform

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.model.clip import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_train_model_on_two_processes_with_locked_image_tower_accumulation_and_wise_ft(
    platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 32, "validation": 16})
    config = {**QUICK_CONFIG, "num_epochs": 2, "train_batch_size": 16, "num_processes": 2, "accum_freq": 2,
              "lock_image": True, "wise_ft_alpha": 0.5, "export_onnx": True}
    model = add_model(platform, shapes, config)
    rig_validation(monkeypatch, best_call=2)  # rank 0 validates here: epoch 2 wins (so the text tower changed)
    ClipAdapter().train_model(model)

    assert platform.model(model.id)["status"] == "trained"
    files = platform.artifact_files(model.id)
    uploaded = safetensors.torch.load(files["open_clip_model.safetensors"])
    # the adapter's base model: the same random init (drawn under the configured seed)
    base = load_model(build_config({k: config[k] for k in ("model_name", "pretrained", "seed")})).model
    base_state = base.state_dict()
    visual = [k for k in base_state if k.startswith("visual.")]
    assert visual and all(torch.equal(uploaded[k], base_state[k]) for k in visual)  # the locked tower
    text = [k for k in base_state if k.startswith("transformer.")]
    assert any(not torch.equal(uploaded[k], base_state[k]) for k in text)  # the text tower trained
    metrics = json.loads(files["metrics.json"])
    assert metrics["best_epoch"] == 2 and metrics["wise_ft_alpha"] == 0.5
    assert metrics["after_fine_tuned"] and metrics["after"]
    assert metrics["after"] != metrics["after_fine_tuned"]  # `after` is the mix's, measured after mixing
    onnx = {a["name"] for a in platform.artifacts(model.id) if a.get("dir", "").endswith("/onnx")}
    assert onnx == {"image_encoder.onnx", "text_encoder.onnx", "preprocess.json"}  # export_onnx, in onnx/
    losses = published(platform, model.id, "loss")  # rank 0 published each epoch's metrics
    assert sorted(next(iter(losses.values()))) == [1, 2]


def test_a_hugging_face_text_tower_trains_uploads_and_embeds_through_the_platform(
    platform: LoopbackPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    from hf_tiny import build_tiny_xlmr

    model_config = build_tiny_xlmr(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 16, "validation": 8})
    model = add_model(platform, shapes, {**QUICK_CONFIG, "model_name": str(model_config)})
    ClipAdapter().train_model(model)

    assert platform.model(model.id)["status"] == "trained"
    files = platform.artifact_files(model.id)
    assert {"config.json", "tokenizer.json"} <= set(files)  # the text tower's config and tokenizer travel along
    shutil.rmtree(tmp_path / "hf")  # the platform's copy must be enough
    adapter = ClipAdapter(model_entity=dl.models.get(model_id=model.id))  # downloads the artifacts
    item = dl.items.get(item_id=shapes.items["validation"][0]["id"])
    (vector,) = adapter.embed([adapter.prepare_item_func(item)])
    assert len(vector) == 64 and float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)
    words = adapter.clip.tokenizer(["ein roter Kreis"])
    assert words.shape == (1, 32) and int(words[0, 1]) != adapter.clip.tokenizer(["a red circle"])[0, 1]
