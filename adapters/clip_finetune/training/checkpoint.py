"""The checkpoint: everything a run needs to continue exactly where it stopped (weights, optimizer, schedule,
scaler, RNG, progress, the selection's and the batch sampler's state, the WiSE-FT base, the run's identity),
written atomically, and read back only into the run it belongs to."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from ..errors import ClipFinetuneError
from ..files import atomic_write
from ..model.safe_load import refused_pickle
from ..model.weights import unwrap
from .state import CHECKPOINT_NAME, CheckpointCallback, Progress, RunState, TrainingDiverged, weights_are_finite

CHECKPOINT_VERSION = 4  # 3: records the identity (data and hyperparameters) of its run; 4: selection, sampler
__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "CheckpointCallback", "RunMismatch", "load", "save"]


class RunMismatch(ClipFinetuneError):
    """A resume checkpoint that is not this run's: other data or hyperparameters, another version, damaged."""


def save(run: RunState, on_checkpoint: CheckpointCallback | None) -> None:
    """Write every state the run needs to resume, atomically; never a checkpoint of non-finite weights, nor one
    in the middle of a streak of bad steps (the last one written stays the last good state). In a distributed
    run every rank checks the (identical) weights and rank 0 writes."""
    if run.checkpoint is None or run.progress.bad_in_a_row:
        return
    model = unwrap(run.clip.model)
    if not weights_are_finite(model):
        raise TrainingDiverged("the weights became non-finite; the last good checkpoint is kept")
    if not run.is_main:
        return
    state = {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "progress": asdict(run.progress),
        "selection": run.selection.state_dict(),
        "sampler": run.sampler.state_dict(),
        "base": run.base_state,
        "identity": run.identity,
    }
    atomic_write(run.checkpoint, lambda p: torch.save(state, p))
    if on_checkpoint is not None:
        on_checkpoint(run.checkpoint)


def load(run: RunState, differences: Callable[[Any], list[str]]) -> bool:
    """Restore `run` from its checkpoint file, if there is one (weights_only: no pickled code is run). A
    checkpoint of another run (`differences(its identity)` not empty), of another version or damaged is
    refused."""
    path = run.checkpoint
    if path is None or not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
        raise refused_pickle(path, "the resume checkpoint", e) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise RunMismatch(f"{str(path)!r} is not a checkpoint this version writes (version {version!r}, "
                          f"expected {CHECKPOINT_VERSION}); start over without resuming, or delete it")
    diffs = differences(state.get("identity"))
    if diffs:
        raise RunMismatch(f"{str(path)!r} belongs to another run: {'; '.join(diffs)}. Resume it with the data and "
                          "hyperparameters it was started with, or start over in another output folder")
    try:
        _restore(run, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RunMismatch(f"{str(path)!r} does not fit this model ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); start over, or delete it") from None
    return True


def _restore(run: RunState, state: dict[str, Any]) -> None:
    unwrap(run.clip.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    run.sampler.load_state_dict(state["sampler"])
    run.selection.load_state_dict(state["selection"])
    run.progress = Progress(**state["progress"])
    if run.base_state is not None:
        run.base_state = state["base"]
