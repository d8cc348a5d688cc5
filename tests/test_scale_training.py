"""Scale features of the training loop: DDP on CPU (gloo, 2 processes) against one process with the same global
batch, gradient accumulation with feature caching against the large batch, frozen towers, gradient
checkpointing and WiSE-FT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_TRAINING, set_args
from safetensors.torch import load_file

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.images import load_image
from adapters.clip_finetune.data.load import Splits
from adapters.clip_finetune.data.synthetic import write_csv
from adapters.clip_finetune.data.tables import read_table
from adapters.clip_finetune.errors import ClipFinetuneError
from adapters.clip_finetune.machine import seed_everything
from adapters.clip_finetune.model.clip import load_artifact, load_model
from adapters.clip_finetune.model.weights import wise_ft
from adapters.clip_finetune.retrieval.evaluate import evaluate
from adapters.clip_finetune.training import CHECKPOINT_NAME, finetune
from adapters.clip_finetune.training import launch as launch_module
from adapters.clip_finetune.training.optim import apply_locks

WEIGHTS = "open_clip_model.safetensors"
TINY = {**TINY_TRAINING, "batch_size": 64, "num_epochs": 3, "warmup": 0.1, "early_stopping": False, "image_cache_mb": 0,
        "grad_clip_norm": None}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[list, list, Path, Path]:
    root = tmp_path_factory.mktemp("scale")
    # each table in its own folder: write_csv puts its PNGs in images/ beside the table, and validation's would
    # overwrite train's first 32 (the leakage guard of load_splits then drops all of validation)
    train_csv, val_csv = write_csv(root / "train.csv", 128, seed=11), write_csv(root / "val" / "val.csv", 32, seed=12)
    return read_table(train_csv), read_table(val_csv), train_csv, val_csv


def _cfg(tiny_model_config: Path, **overrides):
    return build_config(TINY, {"model_name": str(tiny_model_config)}, overrides)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def _base_state(cfg) -> dict[str, torch.Tensor]:
    """The weights fit() starts from under `cfg` (random init under its seed)."""
    seed_everything(cfg.seed)
    return {k: v.clone() for k, v in load_model(cfg).model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def single(tiny_model_config, data, tmp_path_factory):
    train, val, _, _ = data
    out = tmp_path_factory.mktemp("single")
    return finetune(_cfg(tiny_model_config), Splits(train, val), out_dir=out, progress=False), out


@pytest.fixture(scope="module")
def two_processes(tiny_model_config, data, tmp_path_factory):
    train, val, _, _ = data
    out, stopped = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("ddp-stopped")
    epochs: list[int] = []

    def at_epoch_end(epoch: int, _record: dict) -> None:
        epochs.append(epoch)
        if epoch == 1:  # the folder as a run killed now would leave it (its checkpoint is written): for the resume
            shutil.copytree(out, stopped, dirs_exist_ok=True)

    result = finetune(_cfg(tiny_model_config, num_processes=2), Splits(train, val), out_dir=out, progress=False,
                      on_epoch_end=at_epoch_end)
    return result, out, epochs, stopped


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_curve(single, two_processes) -> None:
    (one, one_dir), (two, two_dir, epochs, _) = single, two_processes
    assert epochs == [1, 2, 3]  # rank 0 ran the caller's callback, once per epoch
    assert len(two.history) == len(one.history) == 3
    assert two.best_epoch == one.best_epoch >= 1  # the same epoch won, and it is not the base
    for a, b in zip(one.history, two.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["text_to_image/mrr"] == pytest.approx(a["text_to_image/mrr"], abs=1e-3)
    assert one.history[1]["train_loss"] < one.history[0]["train_loss"]  # it trains
    assert _max_diff(_weights(one_dir), _weights(two_dir)) < 1e-4
    assert not (two_dir / CHECKPOINT_NAME).exists()  # the finished run cleaned up once


@pytest.mark.slow
def test_a_distributed_run_resumes_from_its_checkpoint_under_torchrun_through_the_command_line(
    tiny_model_config, data, single, two_processes, tmp_path
) -> None:
    """Two features on one distributed launch fewer (each rank start-up is seconds of imports): the two-process
    run's folder as it was after epoch 1 (a run stopped there) is resumed by `torchrun ... clip-finetune train
    --resume`, and ends where the uninterrupted run (and the single process) ended."""
    _, _, train_csv, val_csv = data
    uninterrupted, out, _, stopped = two_processes
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    assert (tmp_path / CHECKPOINT_NAME).is_file()  # written by rank 0 at the end of epoch 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "adapters.clip_finetune", "train", "--data", str(train_csv), "--validation", str(val_csv),
         "--out", str(tmp_path), *set_args(TINY), "--set", f"model_name={tiny_model_config}", "--resume"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and done.stdout.count("best epoch") == 1  # printed by rank 0 only
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in uninterrupted.history], rel=1e-5)
    assert _max_diff(_weights(tmp_path), _weights(out)) < 1e-5
    assert _max_diff(_weights(tmp_path), _weights(single[1])) < 1e-4


@pytest.mark.slow
def test_a_rank_that_dies_at_start_fails_the_run_at_once(tiny_model_config, data, monkeypatch, tmp_path) -> None:
    train, _, _, _ = data

    def broken_copy(clip, folder, *args, **kwargs):  # the other ranks get a model folder without weights
        Path(folder).mkdir(parents=True)
        (Path(folder) / "open_clip_config.json").write_text("{}")

    monkeypatch.setattr(launch_module, "save_artifact", broken_copy)
    with pytest.raises(ClipFinetuneError, match="rank 1 exited with code 1 before training started"):
        finetune(_cfg(tiny_model_config, num_processes=2), Splits(train), out_dir=tmp_path, progress=False)


def test_gradient_accumulation_with_feature_caching_equals_the_large_batch(tiny_model_config, data, single,
                                                                          tmp_path) -> None:
    train, val, _, _ = data
    result = finetune(_cfg(tiny_model_config, accum_freq=4), Splits(train, val), out_dir=tmp_path, progress=False)
    one, one_dir = single
    assert [h["train_loss"] for h in result.history] == pytest.approx([h["train_loss"] for h in one.history], rel=1e-4)
    assert _max_diff(_weights(tmp_path), _weights(one_dir)) < 1e-4


def test_locked_towers_do_not_change(tiny_model_config, data) -> None:
    train, _, _, _ = data
    cfg = _cfg(tiny_model_config, lock_image=True, lock_text=True, lock_text_unlocked_layers=2, num_epochs=1)
    seed_everything(cfg.seed)
    before = {k: v.clone() for k, v in load_model(cfg).model.state_dict().items()}
    seed_everything(cfg.seed)
    clip = load_model(cfg)
    finetune(cfg, Splits(train), clip=clip, progress=False)
    after = clip.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert not {k for k in changed if k.startswith("visual.")}  # the image tower is frozen
    # unlocked groups 2: the projection, then the last block and the final norm train
    assert {"text_projection", "transformer.resblocks.1.mlp.c_fc.weight", "ln_final.weight"} <= changed
    assert not {k for k in changed if k.startswith(("transformer.resblocks.0.", "token_embedding"))}
    assert "logit_scale" in changed


def test_gradient_checkpointing_recomputes_activations_and_keeps_the_gradients(tiny_model_config, data) -> None:
    train, _, _, _ = data

    def step(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
        cfg = _cfg(tiny_model_config, grad_checkpointing=checkpointing)
        seed_everything(cfg.seed)
        clip = load_model(cfg)
        apply_locks(clip.model, cfg)
        calls = []
        block = clip.model.visual.transformer.resblocks[0]
        forward = block.forward

        def counted(*args, **kwargs):  # the recomputation calls forward() directly (no module hooks)
            calls.append(1)
            return forward(*args, **kwargs)

        block.forward = counted
        images = torch.stack([clip.preprocess(load_image(p.image)) for p in train[:8]])
        tokens = clip.tokenizer([p.caption for p in train[:8]])
        clip.model.train()
        image_features, text_features, scale = clip.model(images, tokens)[:3]
        (image_features @ text_features.T * scale).logsumexp(1).mean().backward()
        return len(calls), {n: p.grad.clone() for n, p in clip.model.named_parameters() if p.grad is not None}

    plain_calls, plain = step(False)
    ckpt_calls, ckpt = step(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block ran again in the backward pass
    assert _max_diff(plain, ckpt) < 1e-6


def test_wise_ft_alpha_zero_saves_the_base_and_reports_both(tiny_model_config, data, single, tmp_path) -> None:
    train, val, _, _ = data
    cfg = _cfg(tiny_model_config, wise_ft_alpha=0.0)
    base = _base_state(cfg)
    result = finetune(cfg, Splits(train, val), out_dir=tmp_path, progress=False)
    saved = _weights(tmp_path)
    assert all(torch.equal(saved[k], base[k]) for k in base)  # alpha 0: exactly the base
    one, _ = single
    assert result.after_fine_tuned == one.after  # what the unmixed run would have saved
    assert result.after == pytest.approx(result.before)  # the saved model is the base


def test_wise_ft_mixes_base_and_fine_tuned_weights(tiny_model_config, data, single, tmp_path) -> None:
    train, val, _, _ = data
    cfg = _cfg(tiny_model_config, wise_ft_alpha=0.25)
    base = _base_state(cfg)
    result = finetune(cfg, Splits(train, val), out_dir=tmp_path, progress=False)
    one, one_dir = single
    assert result.best_epoch == one.best_epoch >= 1
    fine_tuned = _weights(one_dir)  # the same run, unmixed
    mixed = _weights(tmp_path)
    for k, v in base.items():
        if v.is_floating_point():
            assert torch.allclose(mixed[k], 0.25 * fine_tuned[k] + 0.75 * v, atol=1e-6), k
    assert all(torch.equal(wise_ft(base, fine_tuned, 1.0)[k], fine_tuned[k]) for k in base)  # alpha 1: exactly


def test_evaluate_sweeps_wise_ft_alphas_and_saves_the_chosen_mix(tiny_model_config, data, single, tmp_path,
                                                                 capsys) -> None:
    _, val, _, val_csv = data
    one, one_dir = single
    assert main(["evaluate", "--model", str(one_dir), "--data", str(val_csv), "--wise-ft", "0,0.5,1", "--json",
                 "--set", "num_workers=0", "--save-mix", str(tmp_path / "mix")]) == 2  # one alpha only
    assert "--save-mix needs --wise-ft with exactly one alpha" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(one_dir), "--data", str(val_csv), "--wise-ft", "0,0.5,1", "--json",
                 "--set", "num_workers=0"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert list(sweep) == ["0", "0.5", "1"]
    assert sweep["0"] == pytest.approx(one.before, abs=1e-9)  # alpha 0: the base the run started from
    assert sweep["1"] == pytest.approx(one.after, abs=1e-9)  # alpha 1: the fine-tuned model
    assert sweep["0.5"] != sweep["0"] and sweep["0.5"] != sweep["1"]

    assert main(["evaluate", "--model", str(one_dir), "--data", str(val_csv), "--wise-ft", "0.5",
                 "--set", "num_workers=0", "--save-mix", str(tmp_path / "mix")]) == 0
    assert "alpha=0.5" in capsys.readouterr().out
    mixed, fine_tuned = _weights(tmp_path / "mix"), _weights(one_dir)
    cfg = _cfg(tiny_model_config)
    seed_everything(cfg.seed)
    base = load_model(cfg)
    for k, v in base.model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(mixed[k], (fine_tuned[k] + v) / 2, atol=1e-6), k
    assert evaluate(load_artifact(tmp_path / "mix"), val, 64, 0) == pytest.approx(sweep["0.5"], abs=1e-6)
