"""Weights as tensors: the bare model under wrappers, CPU copies, WiSE-FT mixing, weights read from a saved
model folder."""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME
from safetensors.torch import load_file

from ..errors import ModelError
from .safe_load import check_safetensors


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the bare model's weights on the CPU (unchanged by later training or loading)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def wise_ft(
    base: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT (Wortsman et al. 2022): alpha * fine-tuned + (1 - alpha) * base, tensor by tensor.

    torch.lerp returns `base` exactly at alpha 0 and `fine_tuned` exactly at alpha 1; tensors that are not
    floating point (token ids, masks) are taken from the fine-tuned model.
    """
    if base.keys() != fine_tuned.keys():
        raise ModelError("WiSE-FT: the base and fine-tuned models have different architectures")
    return {k: torch.lerp(base[k].to(v.dtype), v, alpha) if v.is_floating_point() else v
            for k, v in fine_tuned.items()}


def cpu_state_from_artifact(folder: str | Path | None) -> dict[str, torch.Tensor] | None:
    """The weights of a saved model folder (safetensors: nothing is unpickled), or None when it has none."""
    path = Path(folder) / HF_SAFE_WEIGHTS_NAME if folder is not None else None
    if path is None or not path.is_file():
        return None
    check_safetensors(path, "the saved weights")
    return load_file(str(path))
