"""Data-parallel training on PyTorch's own engine (DDP): under `torchrun`, or launched by fit() itself.

Two ways in, one training loop (train.fit):
- `torchrun --nproc_per_node N -m adapters.clip_finetune train ...` (also multi-node, with torchrun's
  rendezvous): each process finds its rank in the environment torchrun sets.
- `num_processes` > 1 (or null with several GPUs) in a plain process (the CLI, the Python API, the Dataloop
  adapter): fit() spawns the other ranks and trains as rank 0 itself, so the caller's callbacks (platform
  metrics, checkpoint uploads) keep running in the caller's process.

The global batch (`train_batch_size`) is split across ranks; open_clip's ClipLoss gathers the features of
all ranks with gradients, so every pair sees the negatives of the whole global batch, as on one device.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import queue
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ClipFinetuneError, ConfigError

log = logging.getLogger(__name__)

# long enough for rank 0 to evaluate a large validation set while the other ranks wait for its decision
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> DistContext | None:
        """The context torchrun (or launch()) put in the environment; None outside a multi-process run."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                           int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))

    def device(self, requested: str | None) -> torch.device:
        """This rank's device: its own GPU (cuda:LOCAL_RANK) when CUDA is used, else the CPU."""
        if torch.cuda.is_available() and requested in (None, "cuda"):
            return torch.device("cuda", self.local_rank)
        return torch.device(requested or "cpu")


def resolve_num_processes(requested: int | None, device: str | None) -> int:
    """`num_processes`: the requested count, else one per visible GPU (one on a CPU)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and device in (None, "cuda") else 0
    if requested is None:
        return max(1, gpus)
    if gpus and requested > gpus:
        raise ConfigError(f"num_processes: {requested} is more than the {gpus} visible GPUs")
    return requested


@contextlib.contextmanager
def process_group(ctx: DistContext, device: torch.device) -> Iterator[None]:
    """Join the process group for the run (NCCL on GPUs, gloo on CPUs); leave it at the end if we joined."""
    if dist.is_initialized():  # the caller manages it
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ctx.rank,
                            world_size=ctx.world_size, timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object: scores, decisions)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_lists(items: list[int]) -> list[int]:
    """The union, in rank order, of each rank's list."""
    boxes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, items)
    return [x for box in boxes for x in box]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _threads_per_process(world: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world)


def _worker(rank: int, world: int, port: int, cfg_json: str, model_dir: str, train_pairs: list, val_pairs: list | None,
            out_dir: str | None, resume: bool, threads: int, ready: Any) -> None:
    """Ranks 1..N-1 of a launched run: the same fit() as rank 0, on a copy of rank 0's starting model."""
    os.environ.update(_rank_env(rank, world, port))
    torch.set_num_threads(threads)  # on a CPU the ranks share the cores; oversubscribed OpenMP threads spin
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
    from .config import FinetuneConfig
    from .model import load_artifact
    from .train import fit

    cfg = FinetuneConfig.model_validate_json(cfg_json)
    clip = load_artifact(model_dir, "cpu")
    ready.put(rank)
    fit(cfg, train_pairs, val_pairs, out_dir=out_dir, clip=clip, progress=False, resume=resume)


def _wait_until_ready(procs: list, ready: Any) -> None:
    """Wait until every spawned rank has started and loaded its model; a rank that dies first is an error now,
    not a wait of TIMEOUT for it to join the process group."""
    waiting = {int(p.name.rsplit("-", 1)[1]) for p in procs}
    while waiting:
        try:
            waiting.discard(ready.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                raise ClipFinetuneError(
                    f"distributed training: {dead[0].name} exited with code {dead[0].exitcode} before training "
                    "started (see its log above)") from None


def launch(nprocs: int, cfg: Any, train_pairs: Any, val_pairs: Any, clip: Any, out_dir: str | Path | None,
           **rank0_kwargs: Any) -> Any:
    """Train on `nprocs` processes on this machine: spawn ranks 1..N-1, run rank 0 here, return its result.

    The other ranks start from rank 0's model, passed as a saved model folder (exact weights, transforms
    and tokenizer, no second download). If any rank fails, the others are stopped and the error is raised;
    the resume checkpoint (rank 0's, in out_dir) stays for `resume=True`.
    """
    from .model import save_artifact
    from .train import fit

    port, threads = _free_port(), _threads_per_process(nprocs)
    staging = Path(tempfile.mkdtemp(prefix="clip-finetune-ranks-"))
    spawn = multiprocessing.get_context("spawn")  # fork would copy CUDA state and torch's thread pools
    ready = spawn.Queue()
    procs = []
    try:
        save_artifact(clip, staging)
        for rank in range(1, nprocs):
            # not daemonic: a daemonic process may not start the DataLoader's worker processes
            p = spawn.Process(target=_worker, name=f"clip-finetune-rank-{rank}", daemon=False,
                              args=(rank, nprocs, port, cfg.model_dump_json(), str(staging), list(train_pairs),
                                    list(val_pairs) if val_pairs else None, str(out_dir) if out_dir else None,
                                    rank0_kwargs.get("resume", False), threads, ready))
            p.start()
            procs.append(p)
        _wait_until_ready(procs, ready)
        log.info("training on %d processes (this one is rank 0)", nprocs)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with _environment(_rank_env(0, nprocs, port)):
                result = fit(cfg, train_pairs, val_pairs, out_dir=out_dir, clip=clip, **rank0_kwargs)
        finally:
            torch.set_num_threads(threads_before)
        for p in procs:
            p.join()
        failed = [p.name for p in procs if p.exitcode != 0]
        if failed:
            raise ClipFinetuneError(f"distributed training: {', '.join(failed)} failed (see their log above)")
        return result
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
        shutil.rmtree(staging, ignore_errors=True)
