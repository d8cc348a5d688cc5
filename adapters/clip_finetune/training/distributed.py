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
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data.decode_cache import cpu_cores
from ..errors import ClipFinetuneError, ConfigError

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
    return max(1, cpu_cores() // world)


JOB_NAME = "job.pkl"
READY_PREFIX = "ready-"


def _worker(staging: Path) -> None:
    """Ranks 1..N-1 of a launched run (`python -m adapters.clip_finetune.training.distributed STAGING`, rank in the
    environment): the same fit() as rank 0, on a copy of rank 0's starting model."""
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
    with open(staging / JOB_NAME, "rb") as f:
        job = pickle.load(f)  # written by launch() in this run's private folder, for these processes only
    torch.set_num_threads(job["threads"])  # on a CPU the ranks share the cores; oversubscribed OpenMP threads spin
    from ..config import FinetuneConfig
    from ..model.clip import load_artifact
    from .loop import fit

    cfg = FinetuneConfig.model_validate_json(job["cfg"])
    clip = load_artifact(staging / "model", "cpu")
    (staging / f"{READY_PREFIX}{rank}").touch()
    fit(cfg, job["train"], job["val"], out_dir=job["out_dir"], clip=clip, progress=False, resume=job["resume"])


def _wait_until_ready(procs: dict[int, subprocess.Popen], staging: Path) -> None:
    """Wait until every rank has started and loaded its model; a rank that dies first is an error now, not a
    wait of TIMEOUT for it to join the process group."""
    while not all((staging / f"{READY_PREFIX}{rank}").exists() for rank in procs):
        dead = {rank: p.returncode for rank, p in procs.items() if p.poll() is not None}
        if dead:
            rank, code = next(iter(dead.items()))
            raise ClipFinetuneError(f"distributed training: rank {rank} exited with code {code} before training "
                                    "started (see its log above)")
        time.sleep(0.2)


def launch(nprocs: int, cfg: Any, train_pairs: Any, val_pairs: Any, clip: Any, out_dir: str | Path | None,
           **rank0_kwargs: Any) -> Any:
    """Train on `nprocs` processes on this machine: start ranks 1..N-1, run rank 0 here, return its result.

    The other ranks are fresh interpreters (`python -m adapters.clip_finetune.training.distributed`), not
    multiprocessing children: those would re-import the caller's main module (a user's script, the Dataloop
    agent), and fork would copy CUDA state and torch's thread pools. They start from rank 0's model, passed as
    a saved model folder (exact weights, transforms and tokenizer, no second download). If any rank fails,
    the others are stopped and the error is raised; the resume checkpoint (rank 0's, in out_dir) stays.
    """
    from ..model.clip import save_artifact
    from .loop import fit

    port, threads = _free_port(), _threads_per_process(nprocs)
    staging = Path(tempfile.mkdtemp(prefix="clip-finetune-ranks-"))
    procs: dict[int, subprocess.Popen] = {}
    try:
        save_artifact(clip, staging / "model")
        job = {"cfg": cfg.model_dump_json(), "train": list(train_pairs), "val": list(val_pairs) if val_pairs else None,
               "out_dir": str(out_dir) if out_dir else None, "resume": rank0_kwargs.get("resume", False),
               "threads": threads}
        with open(staging / JOB_NAME, "wb") as f:
            pickle.dump(job, f)
        # the package's parent folder on the path: the ranks import this package even from an uninstalled checkout
        root = str(Path(__file__).resolve().parents[3])
        path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
        for rank in range(1, nprocs):
            env = {**os.environ, **_rank_env(rank, nprocs, port), "PYTHONPATH": path}
            procs[rank] = subprocess.Popen([sys.executable, "-m", __name__, str(staging)], env=env)
        _wait_until_ready(procs, staging)
        log.info("training on %d processes (this one is rank 0)", nprocs)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with _environment(_rank_env(0, nprocs, port)):
                result = fit(cfg, train_pairs, val_pairs, out_dir=out_dir, clip=clip, **rank0_kwargs)
        finally:
            torch.set_num_threads(threads_before)
        failed = {rank: p.wait() for rank, p in procs.items()}
        failed = {rank: code for rank, code in failed.items() if code}
        if failed:
            raise ClipFinetuneError(f"distributed training: rank(s) {sorted(failed)} failed (see their log above)")
        return result
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
