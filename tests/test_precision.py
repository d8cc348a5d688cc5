"""Precision by hardware (model/precision.py), with the CUDA compute capability mocked: bf16 only from 8.0 on,
fp16 below (a T4 is 7.5), fp32 when asked or on the CPU; the model carries the resolved choice, and evaluation
and embedding autocast with it as training does."""

from __future__ import annotations

import logging

import pytest
import torch

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.model import precision as precision_module
from adapters.clip_finetune.model.clip import load_model
from adapters.clip_finetune.model.precision import autocast_for, resolve_precision
from adapters.clip_finetune.retrieval import embed as embed_module
from adapters.clip_finetune.retrieval.embed import encode_images, encode_texts

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def capability(monkeypatch: pytest.MonkeyPatch):
    """Set the (mocked) compute capability of the CUDA device; is_bf16_supported answers True, as it does on a
    T4 through emulation, so the capability alone must decide."""
    state = {"cc": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["cc"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "mocked GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(precision_module, "_warned", set())
    return lambda cc: state.update(cc=cc)


@pytest.mark.parametrize(("cc", "requested", "expected"), [
    ((7, 5), "auto", "fp16"),  # T4: bf16 is only emulated
    ((7, 0), "auto", "fp16"),  # V100
    ((8, 0), "auto", "bf16"),  # A100
    ((8, 9), "auto", "bf16"),  # L4
    ((9, 0), "auto", "bf16"),  # H100
    ((7, 5), "fp32", "fp32"),
    ((9, 0), "fp32", "fp32"),
    ((9, 0), "fp16", "fp16"),
    ((7, 5), "bf16", "fp16"),  # asked for, but not native: fp16 with loss scaling instead
])
def test_auto_picks_by_compute_capability(capability, cc, requested, expected) -> None:
    capability(cc)
    assert resolve_precision(requested, CUDA) == expected


@pytest.mark.parametrize("requested", ["auto", "fp32", "fp16"])
def test_the_cpu_runs_fp32_unless_bf16_is_asked_or_measured_faster(requested) -> None:
    # a model of unknown width is not on the CPU bf16 list (tests/test_precision_compile.py has the rule)
    assert resolve_precision(requested, CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"


def test_bf16_asked_on_a_t4_warns_once(capability, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            resolve_precision("bf16", CUDA)
    assert caplog.text.count("has no native bf16; running fp16") == 1 and "7.5" in caplog.text


@pytest.mark.filterwarnings("ignore:User provided device_type of 'cuda'")
def test_autocast_follows_the_resolved_precision(capability) -> None:
    assert autocast_for(CUDA, "auto").fast_dtype == torch.float16
    capability((8, 0))
    assert autocast_for(CUDA, "auto").fast_dtype == torch.bfloat16
    assert not isinstance(autocast_for(CUDA, "fp32"), torch.autocast)
    assert not isinstance(autocast_for(CPU, "auto"), torch.autocast)


def test_the_model_carries_its_precision_and_embedding_and_evaluation_use_it(tiny_model_config, monkeypatch,
                                                                             tmp_path) -> None:
    clip = load_model(build_config({"model_name": str(tiny_model_config), "pretrained": None, "precision": "fp32"}))
    assert clip.precision == "fp32"
    seen = []
    real = embed_module.autocast_for
    monkeypatch.setattr(embed_module, "autocast_for", lambda device, p: seen.append(p) or real(device, p))
    from adapters.clip_finetune.data.synthetic import render, sample_specs

    render(sample_specs(1, 0)[0]).save(tmp_path / "x.png")
    clip.precision = "bf16"  # trained in bf16 on a CPU: its embedding still runs fp32 (stock open_clip's vectors)
    encode_texts(clip, ["a red circle"])
    encode_images(clip, [str(tmp_path / "x.png")], num_workers=0, progress=False)
    assert seen == ["fp32", "fp32"]
    seen.clear()
    clip.precision = "fp16"  # as on a T4: on CUDA what embedding asks autocast for is the model's, not "auto"
    monkeypatch.setattr(type(clip), "device", property(lambda self: torch.device("cuda")))
    assert clip.inference_precision == "fp16"
