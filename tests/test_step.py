"""training/step.py: one optimisation step. A non-finite loss skips the update and is counted, a run of them
stops the run with its cause (keeping the last good checkpoint), and the learned temperature stays within CLIP's
bound."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import TINY_TRAINING
from safetensors.torch import load_file

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import Splits
from adapters.clip_finetune.data.synthetic import write_csv
from adapters.clip_finetune.data.tables import read_table
from adapters.clip_finetune.machine import seed_everything
from adapters.clip_finetune.model.clip import load_model
from adapters.clip_finetune.training import CHECKPOINT_NAME, TrainingDiverged, finetune
from adapters.clip_finetune.training import loop as train_module
from adapters.clip_finetune.training.step import MAX_LOGIT_SCALE

WEIGHTS = "open_clip_model.safetensors"
CLIP_LOSS = open_clip.ClipLoss  # the real one, before tests patch the name


@pytest.fixture(scope="module")
def small(tiny_model_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    tables = write_csv(root / "train" / "pairs.csv", 96, seed=5), write_csv(root / "val" / "pairs.csv", 32, seed=6)
    cfg = build_config({**TINY_TRAINING, "model_name": str(tiny_model_config), "num_epochs": 2, "max_bad_steps": 4})
    return cfg, read_table(tables[0]), read_table(tables[1])


class _NanOn:
    """open_clip's loss, but NaN on the chosen steps (0-based) — a stand-in for an fp16 overflow."""

    def __init__(self, bad_steps: set[int] | None) -> None:
        self.loss, self.step, self.bad = CLIP_LOSS(), 0, bad_steps

    def __call__(self, *args):
        value = self.loss(*args)
        bad = self.bad is None or self.step in self.bad
        self.step += 1
        return value * float("nan") if bad else value


def test_non_finite_steps_are_skipped_and_counted(small, monkeypatch, tmp_path) -> None:
    cfg, train, val = small
    monkeypatch.setattr(train_module.open_clip, "ClipLoss", lambda **_: _NanOn({1, 2, 3, 7}))
    result = finetune(cfg, Splits(train, val), out_dir=tmp_path, progress=False)
    assert result.skipped_steps == 4
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / WEIGHTS)).values())


def test_a_run_of_non_finite_steps_stops_with_the_cause_and_keeps_the_last_good_checkpoint(
    small, monkeypatch, tmp_path
) -> None:
    cfg, train, val = small
    cfg = build_config(cfg.model_dump(), {"checkpoint_every_steps": 1})
    monkeypatch.setattr(train_module.open_clip, "ClipLoss", lambda **_: _NanOn(set(range(3, 100))))
    with pytest.raises(TrainingDiverged) as err:
        finetune(cfg, Splits(train, val), out_dir=tmp_path, progress=False)
    message = str(err.value)
    assert "4 consecutive steps had a non-finite loss" in message
    assert "learning_rate 0.001 too high" in message and "precision" in message
    assert str(tmp_path / CHECKPOINT_NAME) in message
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["progress"]["global_step"] == 3  # the last good step's checkpoint, not a later one
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    best = load_file(str(tmp_path / WEIGHTS))  # the best-so-far artifact (the base) is intact
    assert all(torch.isfinite(t).all() for t in best.values())


def test_the_learned_temperature_never_passes_clips_bound(tiny_model_config, small, tmp_path) -> None:
    # an architecture whose logit scale starts above log(100): the first applied step clamps it, as CLIP does
    arch = {**json.loads(Path(tiny_model_config).read_text()), "init_logit_scale": math.log(1000)}
    (tmp_path / "hot-tiny.json").write_text(json.dumps(arch))
    cfg, train, _ = small
    cfg = build_config(cfg.model_dump(), {"model_name": str(tmp_path / "hot-tiny.json"), "num_epochs": 1})
    seed_everything(cfg.seed)
    clip = load_model(cfg)
    assert float(clip.model.logit_scale.detach()) == pytest.approx(math.log(1000))
    finetune(cfg, Splits(train[:32]), clip=clip, progress=False)  # 2 steps: AdamW alone moves it by ~0.002
    assert MAX_LOGIT_SCALE - 0.01 < float(clip.model.logit_scale.detach()) <= MAX_LOGIT_SCALE


@pytest.mark.parametrize("max_norm", [0.0, None, 0.5])
def test_the_norm_without_clipping_is_clip_grad_norms_and_leaves_the_gradients_as_they_are(max_norm):
    from adapters.clip_finetune.training.step import _clip_or_measure

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # a parameter without a gradient is left out, as clip_grad_norm_ does
    model(torch.randn(5, 8)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    reference = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before]))
    norm = _clip_or_measure(model, max_norm)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert float(norm) == pytest.approx(float(reference), rel=1e-6)
    if max_norm:  # clipped to the bound
        assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in after]))) == (
            pytest.approx(max_norm, rel=1e-4))
    else:  # untouched, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
