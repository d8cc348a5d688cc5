"""Which numeric precision a device runs in, and the autocast context for it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

Precision = str  # "auto" | "fp32" | "bf16" | "fp16" (FinetuneConfig.precision)


def resolve_precision(requested: Precision, device: torch.device) -> str:
    """The precision actually used: fp32 on CPU; on CUDA, 'auto' means bf16 if supported, else fp16."""
    if device.type != "cuda":
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def autocast_for(device: torch.device, precision: Precision = "auto") -> AbstractContextManager:
    """Mixed-precision context for `precision` on `device`: bf16 or fp16 autocast on CUDA, nothing on CPU
    or with fp32."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)
