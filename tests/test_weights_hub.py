"""Pretrained weights the machine cannot get fail in seconds with one message; cached ones load offline.

A pretrained tag of the tiny architecture is registered for these tests, with its weights either absent or
placed in a Hugging Face cache laid out as huggingface_hub writes it; the hub is made unreachable.
"""

from __future__ import annotations

import time
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import TINY_MODEL
from huggingface_hub import constants as hf_constants
from open_clip import pretrained as open_clip_pretrained

from adapters.clip_finetune.cli.advice import cli_message
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.errors import ModelError
from adapters.clip_finetune.model import hub
from adapters.clip_finetune.model.clip import load_model, save_artifact

REPO_ID = "loopback/clip-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_tag(monkeypatch, tmp_path) -> Path:
    """A 'loopback' tag of clip-tiny served by the hub, an empty HF cache, and a hub that cannot be reached."""
    load_model(build_config({"model_name": str(TINY_MODEL), "pretrained": None}))  # registers clip-tiny
    tag = {"hf_hub": f"{REPO_ID}/", "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    monkeypatch.setitem(open_clip_pretrained._PRETRAINED, "clip-tiny", {"loopback": tag})
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "reachable", lambda host, *a, **k: False)
    return tmp_path / "hf-cache"


def _cache(cache: Path, weights: dict[str, torch.Tensor]) -> Path:
    """clip-tiny's weights where huggingface_hub keeps a downloaded open_clip_model.safetensors."""
    from safetensors.torch import save_file

    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "open_clip_model.safetensors"))
    return snapshot


def test_weights_neither_cached_nor_reachable_fail_at_once_with_what_to_do(offline_tag) -> None:
    cfg = build_config({"model_name": str(TINY_MODEL), "pretrained": "loopback"})
    started = time.monotonic()
    with pytest.raises(ModelError) as e:
        load_model(cfg)
    assert time.monotonic() - started < 5
    message = str(e.value)
    assert f"pretrained='loopback' of 'clip-tiny': the weights (hf-hub:{REPO_ID}) are not on this machine" in message
    assert "huggingface.co cannot be reached" in message
    # the engine names the setting (pretrained=...); the command line says it as a flag (cli/advice.py)
    assert "pretrained=/path/to/open_clip_model.safetensors" in message and "clip-finetune doctor" in message
    assert "--set pretrained=/path/to/open_clip_model.safetensors" in cli_message(e.value)


def test_the_cli_says_it_in_one_line(offline_tag, tmp_path, capsys) -> None:
    (tmp_path / "images").mkdir()
    code = main(["embed", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "x.npz"),
                 "--set", f"model_name={TINY_MODEL}", "--set", "pretrained=loopback"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot be reached" in err


def test_cached_weights_load_without_the_network(offline_tag) -> None:
    donor = load_model(build_config({"model_name": str(TINY_MODEL), "pretrained": None, "seed": 7}))
    _cache(offline_tag, donor.model.state_dict())
    clip = load_model(build_config({"model_name": str(TINY_MODEL), "pretrained": "loopback"}))
    for key, value in donor.model.state_dict().items():
        assert torch.equal(clip.model.state_dict()[key], value), key
    assert hf_constants.HF_HUB_OFFLINE is False  # offline only while the cached copy loaded


def test_a_local_weights_file_needs_no_hub(offline_tag, tmp_path) -> None:
    donor = load_model(build_config({"model_name": str(TINY_MODEL), "pretrained": None, "seed": 3}))
    folder = save_artifact(donor, tmp_path / "saved")
    weights = folder / "open_clip_model.safetensors"
    clip = load_model(build_config({"model_name": str(TINY_MODEL), "pretrained": str(weights)}))
    assert torch.equal(clip.model.state_dict()["logit_scale"], donor.model.state_dict()["logit_scale"])


def test_doctor_says_which_weights_cannot_be_had(offline_tag, capsys) -> None:
    assert main(["doctor", "--set", f"model_name={TINY_MODEL}", "--set", "pretrained=loopback"]) == 1
    out = capsys.readouterr().out
    assert "problem  weights" in out and "not cached and huggingface.co cannot be reached" in out
    assert "torch" in out and "open_clip_torch" in out and "cpu" in out and "GB free" in out


def test_doctor_is_content_with_a_random_init_model(capsys) -> None:
    assert main(["doctor", "--set", f"model_name={TINY_MODEL}", "--set", "pretrained=null"]) == 0
    out = capsys.readouterr().out
    assert "random init (nothing to download)" in out and out.rstrip().endswith("no problems found")
    # the tiny model is narrower than the CPU bf16 rule's width: fp32 on any CPU, as training will run it
    assert f"{TINY_MODEL} trains in fp32 on cpu, embeds in fp32" in out
