"""The configuration in sections (sections.py): every flat key belongs to a section, a section holds the flat
values, engine functions run on their section alone, and validating a configuration imports no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from adapters.clip_finetune.config import FinetuneConfig, build_config
from adapters.clip_finetune.errors import ConfigError
from adapters.clip_finetune.sections import SECTIONS, OptimisationSection
from adapters.clip_finetune.training.optim import check_sizes, warmup_steps


def test_every_key_is_in_a_section_and_only_the_seed_in_two() -> None:
    owners: dict[str, list[str]] = {}
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            owners.setdefault(f.name, []).append(name)
    assert set(owners) == set(FinetuneConfig.model_fields)
    assert {k: v for k, v in owners.items() if len(v) > 1} == {"seed": ["data", "runtime"]}


def test_a_section_holds_the_flat_values_and_cannot_be_changed() -> None:
    cfg = build_config({"learning_rate": 3e-5, "early_stopping_epochs": 7, "label_templates": ["a {label}"],
                        "num_workers": 2, "lock_text": True})
    assert cfg.optimisation.learning_rate == 3e-5 and cfg.selection.early_stopping_epochs == 7
    assert cfg.data.label_templates == ("a {label}",) and cfg.runtime.num_workers == 2 and cfg.model.lock_text
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optimisation.learning_rate = 1.0  # type: ignore[misc]


def test_the_optimisation_functions_run_on_their_section_alone() -> None:
    opt = build_config({"train_batch_size": 64, "warmup": 0.1}).optimisation
    assert isinstance(opt, OptimisationSection)
    assert check_sizes(opt, 40) == 40 and check_sizes(opt, 1000) == 64  # lowered to the data, else kept
    assert warmup_steps(opt, 90) == 9


def test_validating_a_configuration_imports_no_torch() -> None:
    code = ("import sys\n"
            "from adapters.clip_finetune.config import build_config\n"
            "cfg = build_config({'model_name': 'ViT-L-14', 'device': 'cuda:1'})\n"
            "assert cfg.embeddings_size == 768, cfg.embeddings_size\n"
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12", "mps", "xpu:1", "meta", "banana", "CUDA",
                                    "cuda:", "cuda:-1", "cuda:01", " cuda", "cuda:0:1"])
def test_the_device_check_agrees_with_torch(device: str) -> None:
    try:
        torch.device(device)
        accepted = True
    except (RuntimeError, ValueError, TypeError):
        accepted = False
    if accepted:
        assert build_config({"device": device}).device == device
    else:
        with pytest.raises(ConfigError, match="device: unknown torch device"):
            build_config({"device": device})


def test_an_unknown_architecture_still_suggests_the_close_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'ViT-B-33'; did you mean 'ViT-B-32'"):
        build_config({"model_name": "ViT-B-33"})
