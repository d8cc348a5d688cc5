"""bf16 on CPUs where it was measured faster (model/precision.py), and `compile: true` with its fallback
(model/compiling.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAINING

import adapters.clip_finetune.model.precision as precision
import adapters.clip_finetune.training.loop as loop
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import Splits
from adapters.clip_finetune.data.pairs import CaptionPair
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.model.clip import ClipModel, load_model
from adapters.clip_finetune.model.compiling import compile_module
from adapters.clip_finetune.model.precision import autocast_for, cpu_bf16_is_faster, resolve_precision
from adapters.clip_finetune.training import finetune

CPU = torch.device("cpu")


VIT_B_32 = {"vision_cfg": {"width": 768}, "text_cfg": {"width": 512}}


@pytest.mark.parametrize("flags, model_cfg, faster", [
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", VIT_B_32, True),  # Sapphire Rapids and later: AMX
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", {"vision_cfg": {"width": 96}, "text_cfg": {"width": 64}}, False),
    ("fpu avx512f avx512_bf16 amx_bf16", {"vision_cfg": {"width": 768}, "text_cfg": {"hf_model_name": "x"}}, False),
    ("fpu avx512f avx512_bf16", VIT_B_32, False),  # Cooper Lake, Zen 4: bf16 dot products, no AMX
    ("fpu avx2 fma", VIT_B_32, False),
])
def test_cpu_bf16_rule_reads_the_cpu_flags_and_the_model_size(tmp_path, flags, model_cfg, faster):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n")
    assert cpu_bf16_is_faster(model_cfg, info) is faster
    assert cpu_bf16_is_faster(VIT_B_32, tmp_path / "absent") is False
    assert cpu_bf16_is_faster(None, info) is False


@pytest.mark.parametrize("faster", [True, False])
def test_auto_precision_on_the_cpu_follows_the_rule(monkeypatch, faster):
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda model_cfg: faster)
    assert resolve_precision("auto", CPU, VIT_B_32) == ("bf16" if faster else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp16", CPU) == "fp32"
    clip = ClipModel(torch.nn.Linear(1, 1), None, None, None, VIT_B_32, "test")
    clip.use_precision("auto")
    assert clip.precision == ("bf16" if faster else "fp32")
    # embedding and evaluation: fp32 on a CPU whatever the rule (stock open_clip's vectors)
    with autocast_for(CPU, clip.inference_precision):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for(CPU, "auto"):  # training under 'auto'
        assert torch.is_autocast_enabled("cpu") is faster


def test_bf16_embeddings_stay_within_cosine_0999_of_fp32(tiny_model_config):
    clip = load_model(build_config({"model_name": str(tiny_model_config), "pretrained": None}))
    images = torch.stack([clip.preprocess(render(s, 64)) for s in sample_specs(16, seed=3)])
    tokens = clip.tokenizer([s.caption for s in sample_specs(16, seed=3)])
    clip.model.eval()
    out = {}
    with torch.inference_mode():
        for p in ("fp32", "bf16"):
            with autocast_for(CPU, p):
                out[p] = [torch.nn.functional.normalize(f.float(), dim=-1).numpy()
                          for f in (clip.model.encode_image(images), clip.model.encode_text(tokens))]
    for fp32, bf16 in zip(out["fp32"], out["bf16"], strict=True):
        cosine = np.sum(fp32 * bf16, axis=1)
        assert cosine.min() >= 0.999 and not np.array_equal(fp32, bf16)  # bf16 did run


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here\nsecond line")


def test_compile_falls_back_to_the_uncompiled_module_with_a_clear_warning(caplog):
    torch.manual_seed(0)
    module, x = torch.nn.Linear(4, 2), torch.randn(3, 4)
    want = module(x)
    compile_module(module, "the test module", backend=_failing_backend)
    with caplog.at_level(logging.WARNING):
        got = module(x)
    assert torch.equal(got, want) and module._compiled_call_impl is None
    message = caplog.text
    assert "torch.compile could not compile the test module" in message and "no compiler here" in message
    assert "running it uncompiled" in message and "compile: false" in message


def test_compiled_training_wiring_gives_the_uncompiled_run(tiny_model_config, tmp_path, monkeypatch):
    """compile: true trains the same model (backend 'eager': dynamo traces it, ops run as without it)."""
    pairs = [CaptionPair(str(tmp_path / f"{i}.png"), s.caption) for i, s in enumerate(sample_specs(48, seed=4))]
    for p, s in zip(pairs, sample_specs(48, seed=4), strict=True):
        render(s, 64).save(p.image)
    cfg = build_config(TINY_TRAINING, {"model_name": str(tiny_model_config), "num_epochs": 1, "compile": True,
                                       "checkpoint_every_steps": 0})
    compiled = []
    monkeypatch.setattr(loop, "compile_module",
                        lambda m, what: compiled.append(what) or compile_module(m, what, backend="eager"))
    a = finetune(cfg, Splits(pairs), tmp_path / "a", progress=False)
    b = finetune(build_config(cfg.model_dump(), {"compile": False}), Splits(pairs), tmp_path / "b", progress=False)
    assert compiled == ["the training model"]
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"], rel=1e-5)
    wa = (Path(tmp_path / "a") / "open_clip_model.safetensors").read_bytes()
    assert len(wa) == len((Path(tmp_path / "b") / "open_clip_model.safetensors").read_bytes())  # same keys
