"""training/state.py: the run's state helpers; here the finiteness check that guards checkpoints and validation."""

from __future__ import annotations

import pytest
import torch

from adapters.clip_finetune.training.state import weights_are_finite


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_weight_anywhere_is_found(value: float) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Embedding(50, 8))
    assert weights_are_finite(model)
    with torch.no_grad():
        model[1].weight[37, 5] = value
    assert not weights_are_finite(model)
    assert model[1].weight.grad is None  # checking records no gradient


def test_huge_finite_weights_are_finite_and_half_precision_is_checked() -> None:
    model = torch.nn.Linear(1000, 1000)
    with torch.no_grad():
        model.weight.fill_(3e38)  # their sum would overflow; each is still finite
    assert weights_are_finite(model)
    half = torch.nn.Linear(8, 8).to(torch.bfloat16)
    assert weights_are_finite(half)
    with torch.no_grad():
        half.bias[2] = float("inf")
    assert not weights_are_finite(half)
