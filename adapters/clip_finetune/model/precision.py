"""Which numeric precision a device runs in, and the autocast context for it: training, evaluation and
embedding all go through here (ClipModel.precision carries the resolved training choice,
ClipModel.inference_precision what embedding and evaluation run in)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

Precision = str  # "auto" | "fp32" | "bf16" | "fp16" (FinetuneConfig.precision)
# bf16 runs natively from Ampere (compute capability 8.0) on. Below it torch.cuda.is_bf16_supported() may still
# answer True (emulated), and emulated bf16 is slow or missing in cuBLAS/cuDNN kernels: a T4 (7.5) gets fp16.
BF16_MIN_CAPABILITY = (8, 0)
_warned: set[tuple[str, str]] = set()

# Where bf16 autocast trained measurably faster than fp32 on a CPU (docs/performance.md, "bf16 on the CPU"):
# a CPU with AMX bf16 tiles, and a model whose narrower tower is at least as wide as ViT-B-32's (768 image,
# 512 text: 1.76x the fp32 samples/s). On the same CPU the tiny test model (96 / 64) trained slower in bf16
# (0.89x): its matrix products are too small for the tiles to pay for autocast's casts.
CPU_BF16_FASTER_FLAGS = ("amx_bf16",)
CPU_BF16_MIN_WIDTH = 512


def resolve_precision(requested: Precision, device: torch.device, model_cfg: dict[str, Any] | None = None) -> str:
    """The precision actually used. CPU: 'auto' is bf16 where cpu_bf16_is_faster(model_cfg), else fp32; 'bf16'
    is honoured; 'fp16' runs fp32. CUDA: 'auto' is bf16 on compute capability >= 8 and fp16 (with loss
    scaling) below, and an asked-for bf16 below 8 runs fp16 (with a warning)."""
    if device.type != "cuda":
        if requested == "bf16" or (requested == "auto" and cpu_bf16_is_faster(model_cfg)):
            return "bf16"
        return "fp32"
    if requested == "fp32":
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


def cpu_bf16_is_faster(model_cfg: dict[str, Any] | None, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where bf16 autocast was measured faster than fp32 for training: a CPU with every flag of
    CPU_BF16_FASTER_FLAGS, and an open_clip model config whose towers are both at least CPU_BF16_MIN_WIDTH wide
    (a tower of unknown width, e.g. a Hugging Face text tower, was not measured: fp32)."""
    widths = [(model_cfg or {}).get(tower, {}).get("width") for tower in ("vision_cfg", "text_cfg")]
    if not all(isinstance(w, int) and w >= CPU_BF16_MIN_WIDTH for w in widths):
        return False
    return set(CPU_BF16_FASTER_FLAGS) <= cpu_flags(cpuinfo)


@lru_cache(maxsize=4)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        return frozenset(next((ln.split(":", 1)[1].split() for ln in cpuinfo.read_text().splitlines()
                               if ln.startswith("flags")), []))
    except OSError:
        return frozenset()


def autocast_for(device: torch.device, precision: Precision) -> AbstractContextManager:
    """Mixed-precision context for `precision` on `device`: bf16 or fp16 autocast, nothing with fp32. Training
    passes its resolved precision, embedding and evaluation ClipModel.inference_precision (fp32 on a CPU)."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)
