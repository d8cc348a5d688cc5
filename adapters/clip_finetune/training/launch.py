"""Data-parallel training on one machine without torchrun: start ranks 1..N-1 as fresh interpreters and
train as rank 0 in the caller's process (distributed.py says how the ranks work together).

The other ranks are `python -m adapters.clip_finetune.training.launch STAGING`, not multiprocessing children:
those would re-import the caller's main module (a user's script, the Dataloop agent), and fork would copy
CUDA state and torch's thread pools. They start from rank 0's model, passed as a saved model folder (exact
weights, transforms and tokenizer, no second download), and run the training loop itself (loop.train_rank).
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from typing import NoReturn

import torch

from ..config import FinetuneConfig
from ..data.load import Splits
from ..errors import ClipFinetuneError, ConfigError
from ..machine import apply_config, cpu_cores, exit_process
from ..model.clip import ClipModel, load_artifact, save_artifact
from .distributed import DistContext
from .loop import Hooks, train_rank
from .state import TrainResult

log = logging.getLogger(__name__)

JOB_NAME = "job.pkl"
READY_PREFIX = "ready-"


def resolve_num_processes(requested: int | None, device: str | None) -> int:
    """`num_processes`: the requested count, else one per visible GPU (one on a CPU)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and device in (None, "cuda") else 0
    if requested is None:
        return max(1, gpus)
    if gpus and requested > gpus:
        raise ConfigError(f"num_processes: {requested} is more than the {gpus} visible GPUs")
    return requested


def launch(nprocs: int, cfg: FinetuneConfig, splits: Splits, clip: ClipModel, out_dir: str | Path | None,
           hooks: Hooks, resume: bool) -> TrainResult:
    """Train on `nprocs` processes on this machine: start ranks 1..N-1, run rank 0 here, return its result.

    If any rank fails, the others are stopped and the error is raised; the resume checkpoint (rank 0's, in
    out_dir) stays.
    """
    port, threads = _free_port(), max(1, cpu_cores() // nprocs)
    staging = Path(tempfile.mkdtemp(prefix="clip-finetune-ranks-"))
    procs: dict[int, subprocess.Popen] = {}
    try:
        save_artifact(clip, staging / "model")
        job = {"cfg": cfg.model_dump_json(), "splits": Splits(splits.train, splits.validation),
               "out_dir": str(out_dir) if out_dir else None, "resume": resume, "threads": threads}
        with open(staging / JOB_NAME, "wb") as f:
            pickle.dump(job, f)
        # the package's parent folder on the path: the ranks import this package even from an uninstalled checkout
        root = str(Path(__file__).resolve().parents[3])
        path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
        for rank in range(1, nprocs):
            env = {**os.environ, **_rank_env(rank, nprocs, port), "PYTHONPATH": path}
            # -c, not -m: training/__init__ imports this module first, and `python -m` of a module already
            # imported prints a <frozen runpy> RuntimeWarning in every rank
            start = f"import sys; from {__name__} import _rank_process; _rank_process(sys.argv[1])"
            procs[rank] = subprocess.Popen([sys.executable, "-c", start, str(staging)], env=env)
        _wait_until_ready(procs, staging)
        log.info("training on %d processes (this one is rank 0)", nprocs)
        result = _rank0(cfg, splits, clip, out_dir, hooks, resume, nprocs, port, threads)
        failed = {rank: code for rank, p in procs.items() if (code := p.wait())}
        if failed:
            raise ClipFinetuneError(f"distributed training: rank(s) {sorted(failed)} failed (see their log above)")
        return result
    finally:
        _stop(procs)
        shutil.rmtree(staging, ignore_errors=True)


def _rank0(cfg: FinetuneConfig, splits: Splits, clip: ClipModel, out_dir: str | Path | None, hooks: Hooks,
           resume: bool, nprocs: int, port: int, threads: int) -> TrainResult:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # on a CPU the ranks share the cores; oversubscribed OpenMP threads spin
    try:
        with _environment(_rank_env(0, nprocs, port)):
            return train_rank(cfg, splits, out_dir, clip, hooks, resume, DistContext.from_env())
    finally:
        torch.set_num_threads(threads_before)


def _worker(staging: Path) -> None:
    """Ranks 1..N-1 (rank in the environment): the training loop on a copy of rank 0's starting model."""
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
    with open(staging / JOB_NAME, "rb") as f:
        job = pickle.load(f)  # written by launch() in this run's private folder, for these processes only
    cfg = FinetuneConfig.model_validate_json(job["cfg"])
    apply_config(cfg.data)  # this process's own settings (pixel limit, seeds); rank 0 planned the sizes
    torch.set_num_threads(job["threads"])  # after apply_config, which only ever lowers the count
    clip = load_artifact(staging / "model", "cpu")
    (staging / f"{READY_PREFIX}{rank}").touch()
    train_rank(cfg, job["splits"], job["out_dir"], clip, Hooks(progress=False), job["resume"],
               DistContext.from_env())


def _wait_until_ready(procs: dict[int, subprocess.Popen], staging: Path) -> None:
    """Wait until every rank has started and loaded its model; a rank that dies first is an error now, not a
    wait of the process group's timeout for it to join."""
    while not all((staging / f"{READY_PREFIX}{rank}").exists() for rank in procs):
        dead = {rank: p.returncode for rank, p in procs.items() if p.poll() is not None}
        if dead:
            rank, code = next(iter(dead.items()))
            raise ClipFinetuneError(f"distributed training: rank {rank} exited with code {code} before training "
                                    "started (see its log above)")
        time.sleep(0.2)


def _stop(procs: dict[int, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


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


def _rank_process(staging: str) -> NoReturn:
    """A rank's process: _worker, then the process ends (machine.exit_process); a failure is a traceback, exit 1."""
    _worker(Path(staging))
    exit_process(0)


if __name__ == "__main__":
    _rank_process(sys.argv[1])
