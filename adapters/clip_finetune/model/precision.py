"""Which numeric precision a device runs in, and the autocast context for it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch

Precision = str  # "auto" | "fp32" | "bf16" | "fp16" (FinetuneConfig.precision)

# CPU flags (/proc/cpuinfo) of the CPUs on which bf16 autocast trained measurably faster than fp32: none yet.
# The candidates are AMX (amx_bf16) and avx512_bf16 CPUs, whose bf16 matrix products oneDNN runs natively; the
# benchmark that decides (`python -m bench.train --systems limit,ours,ours-bf16`, docs/performance.md, "bf16 on
# the CPU") could not be run on a quiet machine yet, and on a busy one the tiny model trained slower in bf16.
CPU_BF16_FASTER_FLAGS: tuple[str, ...] = ()


def resolve_precision(requested: Precision, device: torch.device) -> str:
    """The precision actually used. CPU: 'auto' is bf16 where cpu_bf16_is_faster(), else fp32; 'bf16' is
    honoured; 'fp16' runs fp32. CUDA: 'auto' means bf16 if supported, else fp16."""
    if device.type != "cuda":
        if requested == "bf16" or (requested == "auto" and cpu_bf16_is_faster()):
            return "bf16"
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


@lru_cache(maxsize=1)
def cpu_bf16_is_faster(cpuinfo: Path = Path("/proc/cpuinfo"), flags_needed: tuple[str, ...] | None = None) -> bool:
    """True on a CPU that has every flag of CPU_BF16_FASTER_FLAGS (where bf16 was measured faster); False while
    that list is empty, and off Linux."""
    needed = CPU_BF16_FASTER_FLAGS if flags_needed is None else flags_needed
    if not needed:
        return False
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        return False
    return all(f in flags for f in needed)


def autocast_for(device: torch.device, precision: Precision | None = None) -> AbstractContextManager:
    """Mixed-precision context for `precision` on `device`: bf16 or fp16 autocast, nothing with fp32.

    None (embedding and evaluation): 'auto' on CUDA, fp32 on a CPU, where the vectors equal stock open_clip's
    (bf16 there is a training choice; its embeddings are within cosine 0.999, docs/performance.md)."""
    resolved = embedding_precision(device) if precision is None else resolve_precision(precision, device)
    if resolved == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)


def embedding_precision(device: torch.device) -> str:
    """The precision embedding and evaluation run in: 'auto' on CUDA, fp32 on a CPU."""
    return resolve_precision("auto" if device.type == "cuda" else "fp32", device)
