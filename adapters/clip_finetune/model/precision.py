"""Which numeric precision a device runs in, and the autocast context for it: training, evaluation and
embedding all go through here (ClipModel.precision carries the resolved choice)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

log = logging.getLogger(__name__)

Precision = str  # "auto" | "fp32" | "bf16" | "fp16" (FinetuneConfig.precision)
# bf16 runs natively from Ampere (compute capability 8.0) on. Below it torch.cuda.is_bf16_supported() may still
# answer True (emulated), and emulated bf16 is slow or missing in cuBLAS/cuDNN kernels: a T4 (7.5) gets fp16.
BF16_MIN_CAPABILITY = (8, 0)
_warned: set[tuple[str, str]] = set()


def resolve_precision(requested: Precision, device: torch.device) -> str:
    """The precision actually used: fp32 on CPU or when asked; on CUDA, 'auto' is bf16 on compute capability
    >= 8 and fp16 (with loss scaling) below, and an asked-for bf16 below 8 runs fp16 (with a warning)."""
    if device.type != "cuda" or requested == "fp32":
        return "fp32"
    native_bf16 = tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY
    if requested == "auto":
        return "bf16" if native_bf16 else "fp16"
    if requested == "bf16" and not native_bf16:
        if (key := (str(device), requested)) not in _warned:
            _warned.add(key)
            log.warning("precision bf16: %s (compute capability %s) has no native bf16; running fp16 with loss "
                        "scaling instead", torch.cuda.get_device_name(device),
                        ".".join(map(str, torch.cuda.get_device_capability(device))))
        return "fp16"
    return requested


def autocast_for(device: torch.device, precision: Precision = "auto") -> AbstractContextManager:
    """Mixed-precision context for `precision` on `device`: bf16 or fp16 autocast on CUDA, nothing on CPU
    or with fp32."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)
