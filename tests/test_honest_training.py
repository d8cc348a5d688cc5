"""Training reports honest figures: with no validation data a split is held out (and said), a test split is scored
once at the end and reported apart from the selection set; labelled images train and their zero-shot accuracy
rises on held-out images; a run too short to matter says so; QuickGELU for OpenAI weight files; SigLIP models
train with their sigmoid loss and logit_bias."""

from __future__ import annotations

import copy
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAINING, set_args

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import Splits, load_splits
from adapters.clip_finetune.data.synthetic import render, sample_specs, write_csv
from adapters.clip_finetune.data.tables import read_table
from adapters.clip_finetune.model.clip import is_openai_weights_file, load_model
from adapters.clip_finetune.training import finetune
from adapters.clip_finetune.training import loop as train_module
from adapters.clip_finetune.training.optim import MIN_USEFUL_STEPS, make_scheduler, warmup_steps

ZS1 = "zero_shot/top1_accuracy"


def test_training_without_validation_holds_out_and_reports_test_apart_from_selection(tmp_path, tiny_model_config,
                                                                                       capsys, caplog) -> None:
    table = write_csv(tmp_path / "train" / "pairs.csv", 120, seed=21)
    test = write_csv(tmp_path / "test" / "pairs.csv", 30, seed=22)
    sets = {**TINY_TRAINING, "model_name": tiny_model_config, "num_epochs": 2}
    with caplog.at_level("INFO"):
        assert main(["train", "--data", str(table), "--test", str(test), "--out", str(tmp_path / "m"),
                     *set_args(sets)]) == 0
    assert "no validation data: held out from train: 12 of 120 pairs" in caplog.text
    assert "scored on the test split (it chose nothing)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["scored_on"] == "test"
    assert metrics["after"] == metrics["test"]["after"] and metrics["before"] == metrics["test"]["before"]
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert metrics["selection"]["after"]["text_to_image/mrr"] == best["text_to_image/mrr"]
    assert metrics["selection"]["after"] != metrics["test"]["after"]
    assert any("12 pairs were held out" in n for n in metrics["notes"])
    assert any("'after' is the test split (30 pairs)" in n for n in metrics["notes"])
    report = json.loads((tmp_path / "m" / "data_report.json").read_text())
    assert report["train"]["used"] == 108 and report["validation"]["used"] == 12 and report["test"]["used"] == 30
    assert report["validation"]["note"].startswith("held out from train")


def test_without_a_test_split_the_report_says_after_is_the_selection_set(tmp_path, tiny_model_config) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(tiny_model_config), "num_epochs": 1})
    splits = load_splits(write_csv(tmp_path / "pairs.csv", 110, seed=23), cfg=cfg)
    result = finetune(cfg, splits, progress=False)
    assert result.scored_on == "selection" and result.test == {}
    assert result.after == result.selection["after"] and result.before == result.selection["before"]
    assert any("'after' is the selection set (11 pairs), which also picked the best epoch" in n for n in result.notes)


def test_a_run_too_short_to_matter_says_so_and_still_warms_up(tmp_path, tiny_model_config, caplog) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(tiny_model_config), "train_batch_size": 64,
                        "num_epochs": 2})
    assert warmup_steps(cfg, 5) == 1 and warmup_steps(cfg, 90) == 9 and warmup_steps(cfg, 0) == 0
    pairs = read_table(write_csv(tmp_path / "pairs.csv", 70, seed=24))
    with caplog.at_level("WARNING"):
        result = finetune(cfg, Splits(pairs), progress=False)
    note = "only 2 optimisation steps (70 pairs in batches of 64, 2 epochs): too few to change a pretrained model"
    assert any(n.startswith(note) for n in result.notes) and note in caplog.text
    assert str(MIN_USEFUL_STEPS) in result.notes[0]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    assert make_scheduler(optimizer, cfg, 5).get_last_lr()[0] < cfg.learning_rate  # step 1 runs below the peak


# ------------------------------------------------------------------------------------------- labels
@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """A folder per class (train/ and validation/, 8 colours, labels under a hierarchy 'things.<colour>')."""
    root = tmp_path_factory.mktemp("colours")
    for split, n, seed in (("train", 320, 25), ("validation", 80, 26)):
        for i, spec in enumerate(sample_specs(n, seed)):
            folder = root / split / f"things.{spec.attributes['colour']}"
            folder.mkdir(parents=True, exist_ok=True)
            render(spec).save(folder / f"{i:04d}.png")
    return root


def test_a_labelled_image_set_trains_and_zero_shot_accuracy_rises_on_held_out_images(colours, tiny_model_config,
                                                                                     tmp_path) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(tiny_model_config), "train_batch_size": 32,
                        "num_epochs": 3, "early_stopping": False, "batch_size": 128})
    splits = load_splits(colours, cfg=cfg)
    assert {p.label for p in splits.validation} == {"red", "orange", "yellow", "green", "cyan", "blue", "purple",
                                                    "pink"}
    result = finetune(cfg, splits, tmp_path, progress=False)
    before, after = result.before, result.after
    assert before[ZS1] < 0.3 and after[ZS1] >= before[ZS1] + 0.2, (before[ZS1], after[ZS1])
    assert after["zero_shot/top5_accuracy"] > before["zero_shot/top5_accuracy"]
    per_class = {k.rsplit("/", 1)[1]: v for k, v in after.items() if k.startswith("zero_shot/accuracy/")}
    assert len(per_class) == 8 and all(0 <= v <= 1 for v in per_class.values())


# ------------------------------------------------------------------------------------ list 5's small items
def test_openai_weight_files_get_quickgelu(tmp_path, tiny_model_config) -> None:
    cfg = {"model_name": str(tiny_model_config), "pretrained": None}
    weights = tmp_path / "clip-tiny-openai.pt"
    torch.save(load_model(build_config(cfg)).model.state_dict(), weights)
    model = load_model(build_config(cfg, {"pretrained": str(weights)})).model
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    plain = tmp_path / "clip-tiny-finetuned.pt"
    weights.rename(plain)
    assert type(load_model(build_config(cfg, {"pretrained": str(plain)})).model.visual.transformer.resblocks[0]
                .mlp.gelu).__name__ == "GELU"
    archive = tmp_path / "ViT-B-32.pt"  # OpenAI's releases are TorchScript archives
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), archive)
    assert is_openai_weights_file(str(archive)) and not is_openai_weights_file(str(plain))
    with zipfile.ZipFile(archive) as z:
        assert any(n.endswith("constants.pkl") for n in z.namelist())


@pytest.fixture(scope="module")
def siglip_config(tmp_path_factory, tiny_model_config) -> Path:
    cfg = json.loads(Path(tiny_model_config).read_text())
    cfg = {**copy.deepcopy(cfg), "init_logit_bias": -10.0, "init_logit_scale": math.log(10)}
    # not named *siglip*: open_clip picks a tokenizer by name, and SigLIP's is downloaded
    path = tmp_path_factory.mktemp("sigmoid") / "sigmoid-tiny.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("accum_freq", [1, 2])
def test_siglip_models_train_with_the_sigmoid_loss_and_their_logit_bias(siglip_config, tmp_path, accum_freq,
                                                                        monkeypatch) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(siglip_config), "num_epochs": 1, "accum_freq": accum_freq})
    pairs = read_table(write_csv(tmp_path / "pairs.csv", 32, seed=27))
    clip = load_model(cfg)
    losses = []
    real = train_module._make_loss
    monkeypatch.setattr(train_module, "_make_loss", lambda *a: losses.append(real(*a)) or losses[-1])
    finetune(cfg, Splits(pairs), clip=clip, progress=False)
    assert losses[0].sigmoid and type(losses[0].loss).__name__ == "SigLipLoss"
    assert clip.model.logit_bias.item() != -10.0  # the bias trained (it was dropped before)
