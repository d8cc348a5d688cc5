"""Where a process sits in a data-parallel run (DDP) and the collectives the training loop needs.

Imports only torch: launching ranks (launch.py) and the loop (loop.py) build on it. Two ways in, one loop:
- `torchrun --nproc_per_node N -m adapters.clip_finetune train ...` (also multi-node, with torchrun's
  rendezvous): each process finds its rank in the environment torchrun sets.
- `num_processes` > 1 (or null with several GPUs) in a plain process (the CLI, the Python API, the Dataloop
  adapter): launch.py starts the other ranks and the caller trains as rank 0.

The global batch (`train_batch_size`) is split across ranks; open_clip's ClipLoss gathers the features of
all ranks with gradients, so every pair sees the negatives of the whole global batch, as on one device.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

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
        """The context torchrun (or launch.py) put in the environment; None outside a multi-process run."""
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


def all_reduce_min(n: int, device: torch.device) -> int:
    """The smallest of every rank's `n`."""
    size = torch.tensor([n], device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MIN)
    return int(size.item())


def mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    """The mean over ranks of a scalar tensor (non-finite if any rank's is)."""
    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total.item() / world_size
