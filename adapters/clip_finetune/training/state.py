"""What a run knows besides its tensors: progress (for exact resume), the result, the live objects grouped
for checkpointing, and the best-epoch and early-stopping bookkeeping."""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from ..config import FinetuneConfig
from ..errors import ClipFinetuneError
from ..files import atomic_write
from ..model.clip import ClipModel
from ..model.safe_load import refused_pickle
from ..model.weights import unwrap
from ..retrieval.eval_cache import EvalCache
from .distributed import DistContext, all_gather_lists

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 3  # 3: records the identity (data and hyperparameters) of its run
CheckpointCallback = Callable[[Path], None]


class RunMismatch(ClipFinetuneError):
    """A resume checkpoint that is not this run's: other data or hyperparameters, another version, damaged."""


class TrainingDiverged(ClipFinetuneError):
    """Too many consecutive steps had a non-finite loss or gradients, or the weights became non-finite."""


@dataclass
class TrainResult:
    """What a run produced: the best epoch, metrics before and after, and the per-epoch history.

    `before`/`after` are the headline figures: on the test split when there is one (scored at the start and once
    at the end, never used to choose), else on the selection set (validation, or held out from train), which
    picked the best epoch and so flatters `after`; `scored_on` says which. `selection` and `test` keep both."""

    best_epoch: int  # 0 means no epoch beat the base model; the saved weights are then the base's
    metric: str
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    out_dir: Path | None = None
    skipped_images: int = 0
    skipped_steps: int = 0  # steps with a non-finite loss or gradients, not applied
    wise_ft_alpha: float = 1.0
    after_fine_tuned: dict[str, float] = field(default_factory=dict)  # before WiSE-FT mixing (alpha < 1 only)
    note: str = ""  # what to know about the result; set when no epoch beat the base model
    scored_on: str = "selection"  # "test", "selection" (validation or held-out) or "none" (no evaluation data)
    selection: dict[str, dict[str, float]] = field(default_factory=dict)  # {"before", "after"} on the selection set
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # {"before", "after"} on the test split
    notes: list[str] = field(default_factory=list)  # what a reader of the figures should know

    @property
    def improved(self) -> bool:
        """Whether an epoch beat the base model (else the saved weights are the base model's)."""
        return self.best_epoch > 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "out_dir"}


@dataclass
class Progress:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped."""

    epoch: int = 1  # the epoch in progress (1-based)
    batches_done: int = 0  # batches of that epoch already trained
    global_step: int = 0
    loss_sum: float = 0.0  # this epoch's finite losses, for its mean
    loss_count: int = 0
    epoch_seconds: float = 0.0
    best_score: float = -math.inf
    best_epoch: int = 0
    stale: int = 0  # epochs since the best
    before: dict[str, float] = field(default_factory=dict)
    test_before: dict[str, float] = field(default_factory=dict)  # the base model on the test split
    history: list[dict[str, float]] = field(default_factory=list)
    bad_pairs: list[int] = field(default_factory=list)  # indices of training pairs whose image failed
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    finished: bool = False

    def skip_step(self) -> None:
        """Count a step whose loss or gradients were non-finite: it was not applied."""
        self.skipped_steps += 1
        self.bad_in_a_row += 1

    def add_loss(self, loss: float | None) -> None:
        if loss is not None and math.isfinite(loss):
            self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1

    def next_epoch(self, stop: bool, num_epochs: int) -> None:
        self.epoch += 1
        self.batches_done, self.loss_sum, self.loss_count, self.epoch_seconds = 0, 0.0, 0, 0.0
        self.finished = stop or self.epoch > num_epochs


@dataclass
class RunState:
    """The live objects of a run, grouped so checkpoints save and restore them together."""

    cfg: FinetuneConfig
    clip: ClipModel
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    progress: Progress
    checkpoint: Path | None
    train_model: torch.nn.Module  # the model the steps run (DDP-wrapped in a distributed run)
    precision: str
    ctx: DistContext | None = None  # None: a single process
    base_state: dict[str, torch.Tensor] | None = None  # the starting weights, kept for WiSE-FT (alpha < 1)
    num_workers: int = 0  # DataLoader worker processes decoding the training images
    identity: dict[str, Any] | None = None  # the data and hyperparameters a checkpoint must match (guard.py)
    keys: tuple[np.ndarray, np.ndarray] | None = None  # (image ids, caption ids) per training pair (duplicates)
    notes: list[str] = field(default_factory=list)  # for the result: what a reader of the figures should know
    eval_cache: EvalCache | None = None  # what this run's evaluations reuse (rank 0 with validation pairs)

    @property
    def is_main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    @property
    def world_size(self) -> int:
        return self.ctx.world_size if self.ctx is not None else 1

    def save_checkpoint(self, on_checkpoint: CheckpointCallback | None) -> None:
        """Write every state the run needs to resume, atomically; never a checkpoint of non-finite weights,
        nor one in the middle of a streak of bad steps (the last one written stays the last good state).
        In a distributed run every rank checks the (identical) weights and rank 0 writes."""
        if self.checkpoint is None or self.progress.bad_in_a_row:
            return
        model = unwrap(self.clip.model)
        if not weights_are_finite(model):
            raise TrainingDiverged("the weights became non-finite; the last good checkpoint is kept")
        if not self.is_main:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "progress": asdict(self.progress),
            "base": self.base_state,
            "identity": self.identity,
        }
        atomic_write(self.checkpoint, lambda p: torch.save(state, p))
        if on_checkpoint is not None:
            on_checkpoint(self.checkpoint)

    def load_checkpoint(self, differences: Callable[[Any], list[str]]) -> bool:
        """Restore from the checkpoint file, if there is one (weights_only: no pickled code is run). A checkpoint
        of another run (`differences(its identity)` not empty), of another version or damaged is refused."""
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
            raise refused_pickle(self.checkpoint, "the resume checkpoint", e) from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise RunMismatch(f"{str(self.checkpoint)!r} is not a checkpoint this version writes (version {version!r}, "
                              f"expected {CHECKPOINT_VERSION}); start over without resuming, or delete it")
        diffs = differences(state.get("identity"))
        if diffs:
            raise RunMismatch(f"{str(self.checkpoint)!r} belongs to another run: {'; '.join(diffs)}. Resume it with "
                              "the data and hyperparameters it was started with, or start over (clip-finetune train "
                              "--overwrite, or another output folder)")
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise RunMismatch(f"{str(self.checkpoint)!r} does not fit this model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); start over, or delete it") from None
        return True

    def _restore(self, state: dict[str, Any]) -> None:
        unwrap(self.clip.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.progress = Progress(**state["progress"])
        if self.base_state is not None:
            self.base_state = state["base"]

    def sync_bad_pairs(self) -> None:
        """Every rank sees the undecodable images of its own slices: make the list whole on every rank."""
        if self.ctx is not None:
            self.progress.bad_pairs = sorted(set(all_gather_lists(self.progress.bad_pairs)))

    def diverged(self, what: str) -> TrainingDiverged:
        p, cfg = self.progress, self.cfg
        kept = f"the last good checkpoint is kept in {self.checkpoint}" if self.checkpoint else "no checkpoint was kept"
        return TrainingDiverged(
            f"training diverged at epoch {p.epoch}, step {p.global_step}: {what}; {kept}. Likely causes: "
            f"learning_rate {cfg.learning_rate:g} too high (fine-tuning recipes use 1e-7 to 5e-6), or fp16 "
            f"overflow (set precision to 'bf16' or 'fp32')"
        )


def weights_are_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def epoch_record(run: RunState, scores: dict[str, float], seconds: float) -> dict[str, float]:
    """One line of the run's history: epoch, mean training loss, learning rate, time and validation scores."""
    p = run.progress
    return {"epoch": p.epoch, "train_loss": p.loss_sum / p.loss_count if p.loss_count else math.nan,
            "lr": run.scheduler.get_last_lr()[0], "seconds": seconds, **scores}


def judge_epoch(run: RunState, record: dict[str, float], has_validation: bool) -> tuple[bool, bool]:
    """Record the epoch and decide: (improved on the best so far, stop early). Without validation every
    epoch counts as the best and nothing stops early."""
    p, cfg = run.progress, run.cfg
    metric = cfg.early_stopping_metric
    p.history.append(record)
    improved = not has_validation or record[metric] > p.best_score  # NaN never improves
    if improved:
        p.best_score, p.best_epoch, p.stale = record.get(metric, math.nan), p.epoch, 0
    else:
        p.stale += 1
    if has_validation:
        log.info("epoch %d: loss %.4f, %s %.4f%s", p.epoch, record["train_loss"], metric, record[metric],
                 " (best)" if improved else "")
    else:
        log.info("epoch %d: loss %.4f", p.epoch, record["train_loss"])
    stop = has_validation and cfg.early_stopping and p.stale >= cfg.early_stopping_epochs
    if stop:
        log.info("early stopping: no %s gain for %d epochs", metric, p.stale)
    return improved, stop


def result_of(run: RunState) -> TrainResult:
    """The run's result from its progress: the best epoch's validation scores are the selection set's 'after'
    figures, and the headline ones until a test split replaces them (loop._finish)."""
    p, cfg = run.progress, run.cfg
    best = p.history[p.best_epoch - 1] if p.best_epoch else p.before
    after = {k: v for k, v in best.items() if "/" in k}
    result = TrainResult(p.best_epoch, cfg.early_stopping_metric, p.before, after, p.history,
                         skipped_images=len(p.bad_pairs), skipped_steps=p.skipped_steps,
                         wise_ft_alpha=cfg.wise_ft_alpha, scored_on="selection" if p.before else "none",
                         selection={"before": p.before, "after": after} if p.before else {}, notes=list(run.notes))
    if not result.improved:
        result.note = no_gain_note(cfg, p.before.get(cfg.early_stopping_metric, math.nan), len(p.history))
    return result


def no_gain_note(cfg: FinetuneConfig, base_score: float, epochs: int) -> str:
    """What to say, and what to change, when no epoch beat the base model."""
    return (f"no epoch beat the base model on {cfg.early_stopping_metric} ({base_score:.4f}) in {epochs} epochs: "
            f"the saved weights are the base model's. Train longer (num_epochs, now {cfg.num_epochs}; "
            f"early_stopping_epochs, now {cfg.early_stopping_epochs}), raise learning_rate (now "
            f"{cfg.learning_rate:g}; fine-tuning a pretrained CLIP works at 1e-7 to 5e-6, a random init needs far "
            "more), or check that the validation captions describe their images" + _ceiling_hint(cfg, base_score))


CEILING = 0.9  # a base score this close to the best possible 1 leaves early stopping little to see


def _ceiling_hint(cfg: FinetuneConfig, base_score: float) -> str:
    """Few distinct captions (a class folder of few classes: one caption per class) put MRR near 1 before any
    training, so no epoch can beat it by much and early stopping ends the run on noise."""
    if not base_score >= CEILING or cfg.early_stopping_metric.endswith(("/map", "/r_precision")):
        return ""
    return (f"; the base model already scores {base_score:.2f} of at most 1 on {cfg.early_stopping_metric}, which "
            "happens with few distinct captions (e.g. few classes): select on text_to_image/map "
            "(early_stopping_metric), which counts every image of a class, or set early_stopping false")
