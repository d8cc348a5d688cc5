"""model/lazy_tokenizer.py: a saved model's tokenizer is made when first read, and open_clip's BPE tokenizer is
built once per process for each of its settings (context length, tokenizer kwargs), never shared across them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import torch
from helpers import TINY_MODEL, TINY_TRAINING

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.model.clip import load_artifact, load_model, save_artifact
from adapters.clip_finetune.model.lazy_tokenizer import TokenizerLater, _bpe_key, shared_tokenizer

CAPTIONS = ["a red circle on the left", "Zwei blaue Quadrate, oben rechts", ""]


def _with_context_length(folder: Path, length: int) -> Path:
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["context_length"] = length
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def test_models_with_the_same_bpe_settings_share_one_tokenizer_that_encodes_as_open_clips(tmp_path: Path) -> None:
    first = load_model(build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)}))
    second = load_model(build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL), "seed": 7}))
    assert first.tokenizer is second.tokenizer
    save_artifact(first, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = load_artifact(tmp_path / "a", "cpu"), load_artifact(tmp_path / "b", "cpu")
    assert isinstance(a.__dict__["_tokenizer"], TokenizerLater)  # not built until read
    assert a.tokenizer is b.tokenizer  # two folders, one setting
    fresh = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'a'}")
    assert a.tokenizer is not fresh and torch.equal(a.tokenizer(CAPTIONS), fresh(CAPTIONS))


def test_another_context_length_gets_its_own_tokenizer_even_in_a_folder_read_before(tmp_path: Path) -> None:
    save_artifact(load_model(build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})), tmp_path / "m")
    spec = f"local-dir:{tmp_path / 'm'}"
    before = shared_tokenizer(spec)
    long = shared_tokenizer(f"local-dir:{_with_context_length(tmp_path / 'm', 96)}")  # the folder rewritten
    assert long is not before and long(CAPTIONS).shape == (3, 96) and before(CAPTIONS).shape[1] != 96
    assert shared_tokenizer(spec) is long  # the same folder now holds the other setting


def test_tokenizers_read_from_files_or_picked_by_name_are_never_shared(tmp_path: Path) -> None:
    assert _bpe_key("hf-hub:timm/ViT-B-16-SigLIP") is None  # a hub config: get_tokenizer reads it each time
    assert _bpe_key("ViT-B-16-SigLIP") is None  # SigLIP's tokenizer, chosen by the name
    assert _bpe_key("xlm-roberta-base-ViT-B-32") is None  # an HF tokenizer (hf_tokenizer_name)
    assert _bpe_key(f"local-dir:{tmp_path}") is None  # no config there: get_tokenizer says what is missing
    b32, l14 = _bpe_key("ViT-B-32"), _bpe_key("ViT-L-14")
    assert b32 is not None and l14 is not None and b32 != l14 and b32[1] == l14[1]  # same settings, named apart
