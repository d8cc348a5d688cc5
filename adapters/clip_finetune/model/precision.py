"""Which numeric precision a device runs in, and the autocast context for it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch

Precision = str  # "auto" | "fp32" | "bf16" | "fp16" (FinetuneConfig.precision)

# CPU flags (/proc/cpuinfo) of the matrix units that bf16 autocast uses through oneDNN; measured faster than
# fp32 in training and embedding only where AMX is there (docs/performance.md, "bf16 on the CPU")
CPU_BF16_FASTER_FLAGS = ("amx_bf16",)


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
def cpu_bf16_is_faster(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on a CPU where bf16 autocast was measured faster than fp32: one with AMX tiles for bf16.

    CPUs with avx512_bf16 but no AMX (Cooper Lake, Zen 4), measured here with oneDNN limited to
    AVX512_CORE_BF16, were not faster: they stay in fp32. Reads the Linux CPU flags; False elsewhere.
    """
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        return False
    return all(f in flags for f in CPU_BF16_FASTER_FLAGS)


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
