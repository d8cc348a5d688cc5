"""The process and the machine it runs on: cores (cgroup-aware), a decoding thread pool, seeding, the
process-wide settings a configuration applies (`apply_config`), and ending the process (`exit_process`)."""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from PIL import Image

if TYPE_CHECKING:
    from .sections import DataSection

log = logging.getLogger(__name__)
T = TypeVar("T")

PILLOW_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own default (about 89 megapixels)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_cores(cgroup_root: Path | None = None) -> int:
    """The cores this process may use: its affinity mask, capped by the cgroup's CPU quota when one is set.

    A Kubernetes pod (a Dataloop service) limits CPU with a quota, not with affinity: a pod limited to 2 CPUs
    on a 64-core node still sees 64 cores in its affinity mask, and sizing threads and workers by that
    oversubscribes the 2 it may use.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(CGROUP_ROOT if cgroup_root is None else cgroup_root)  # read at call time
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`);
    None when no quota is set or none can be read."""
    root = CGROUP_ROOT if root is None else root
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100_000)
        v1 = root / "cpu" if (root / "cpu").is_dir() else root
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def decode_threads() -> int:
    """Threads for decoding one batch: every core in the main process (the model is idle meanwhile: with
    workers=0 loading and computing alternate), one inside a DataLoader worker process (already parallel)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        return 1
    return cpu_cores()


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="decode")


def thread_map(fn: Callable[[Any], T], items: Sequence[Any], threads: int | None = None) -> list[T]:
    """[fn(x) for x in items], in order, on `threads` threads (default: decode_threads()). Pillow releases
    the GIL while decoding and resizing, so image work runs in parallel."""
    threads = decode_threads() if threads is None else threads
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(threads).map(fn, items))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (data order and augmentation have their own seeds)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_max_image_pixels(n: int | None = PILLOW_MAX_IMAGE_PIXELS) -> None:
    """Set the decompression-bomb limit (pixels per image) for every Pillow decode in this process.

    None turns the protection off: only do that for trusted data.
    """
    Image.MAX_IMAGE_PIXELS = n


def limit_torch_threads() -> int:
    """Cap torch's intra-op threads at cpu_cores(): torch sizes its pool by the affinity mask, so on a pod
    limited by a cgroup quota it starts one spinning OpenMP thread per node core. Never raises the count (a
    caller that chose fewer threads keeps them). Returns the count in force."""
    import torch

    threads = min(torch.get_num_threads(), cpu_cores())
    if threads != torch.get_num_threads():
        log.info("torch threads: %d -> %d (the CPU quota of this process)", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
    return threads


def apply_config(cfg: DataSection) -> None:
    """Apply what a configuration's data section sets for the whole process: the image pixel limit, the seeds
    and torch's thread count (capped by the CPU quota). A whole FinetuneConfig holds the same two keys.

    Each entry point (CLI command, API worker, Dataloop adapter) calls it once it has validated a
    configuration, and training calls it when a run starts, so every decode honours the limit and a run is
    seeded whoever started it.
    """
    set_max_image_pixels(cfg.max_image_pixels)
    seed_everything(cfg.seed)
    limit_torch_threads()


def exit_process(code: int | None) -> NoReturn:
    """End this process (a command, a rank, a background run) with exit status `code`, leaving the objects alive
    now out of the interpreter's garbage collection at exit (gc.freeze). With torch, open_clip and transformers
    imported, that collection walks ~800,000 objects that are all about to go anyway: measured 1.3-1.7 s of every
    `clip-finetune` process's exit, 0.2 s frozen. The atexit handlers (logging's flush, the trackers') still
    run and the modules are still torn down; what is skipped is only the search for unreachable cycles, whose
    finalizers Python never promises to run at exit. Only for a process's last line: frozen objects are never
    collected, so a caller that goes on (main() called in-process) must not use it."""
    gc.freeze()
    sys.exit(code)
