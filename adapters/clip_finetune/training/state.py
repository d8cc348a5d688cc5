"""What a run knows besides its tensors: progress (for exact resume), the result, and the live objects grouped
for checkpointing (checkpoint.py writes and reads them; selection.py picks the best epoch; sampler.py draws the
batches)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from ..config import FinetuneConfig
from ..errors import ClipFinetuneError
from ..model.clip import ClipModel
from ..retrieval.eval_cache import EvalCache
from ..retrieval.evaluation_result import EvaluationResult
from ..sections import OptimisationSection
from .distributed import DistContext, all_gather_lists
from .sampler import BatchSampler
from .selection import Selection

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"  # checkpoint.py writes and reads it; guard.py and the faces look for it
CheckpointCallback = Callable[[Path], None]


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
    # auto WiSE-FT (retention.py): each alpha's {alpha, target, retention}, and the seconds the sweep took
    wise_ft_curve: list[dict[str, float | None]] = field(default_factory=list)
    wise_ft_seconds: float = 0.0
    retention: dict[str, dict[str, float]] = field(default_factory=dict)  # {"before", "after"[, "fine_tuned"]}

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
    before: dict[str, float] = field(default_factory=dict)
    test_before: dict[str, float] = field(default_factory=dict)  # the base model on the test split
    retention_before: dict[str, float] = field(default_factory=dict)  # the base model on the retention set
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


@dataclass(kw_only=True)
class RunState:
    """The live objects of a run, grouped so checkpoints save and restore them together (built by keyword)."""

    cfg: FinetuneConfig
    opt: OptimisationSection  # cfg's optimisation section, what the steps and the result read
    clip: ClipModel
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    progress: Progress
    selection: Selection  # the best epoch so far, early stopping
    sampler: BatchSampler  # the batches of each epoch
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
    retention_cache: EvalCache | None = None  # the same for the retention set (rank 0 with retention pairs)
    evaluation: EvaluationResult | None = None  # the latest evaluation, per query (rank 0): per_query.json
    retention_base: EvaluationResult | None = None  # the base model on the retention set, per query

    @property
    def is_main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    @property
    def world_size(self) -> int:
        return self.ctx.world_size if self.ctx is not None else 1

    def sync_bad_pairs(self) -> None:
        """Every rank sees the undecodable images of its own slices: make the list whole on every rank."""
        if self.ctx is not None:
            self.progress.bad_pairs = sorted(set(all_gather_lists(self.progress.bad_pairs)))

    def diverged(self, what: str) -> TrainingDiverged:
        p = self.progress
        kept = f"the last good checkpoint is kept in {self.checkpoint}" if self.checkpoint else "no checkpoint was kept"
        return TrainingDiverged(
            f"training diverged at epoch {p.epoch}, step {p.global_step}: {what}; {kept}. Likely causes: "
            f"learning_rate {self.opt.learning_rate:g} too high (fine-tuning recipes use 1e-7 to 5e-6), or fp16 "
            f"overflow (set precision to 'bf16' or 'fp32')"
        )


def weights_are_finite(model: torch.nn.Module) -> bool:
    """No NaN or infinity in the model's parameters. Each tensor times 0 sums to 0 exactly when it is finite
    (a finite x gives 0, inf and NaN give NaN; no sum of zeros overflows): ~4x faster than torch.isfinite(p).all(),
    which fills a bool tensor first (measured 2.2 vs 8.9 ms for clip-tiny, at every checkpoint and validation)."""
    with torch.no_grad():
        return all(math.isfinite(torch.mul(p, 0).sum()) for p in model.parameters())


def epoch_record(run: RunState, scores: dict[str, float], seconds: float) -> dict[str, float]:
    """One line of the run's history: epoch, mean training loss, learning rate, time and validation scores."""
    p = run.progress
    return {"epoch": p.epoch, "train_loss": p.loss_sum / p.loss_count if p.loss_count else math.nan,
            "lr": run.scheduler.get_last_lr()[0], "seconds": seconds, **scores}


def judge_epoch(run: RunState, record: dict[str, float]) -> tuple[bool, bool]:
    """Record the epoch in the history and judge it (selection.py): (improved on the best so far, stop early)."""
    run.progress.history.append(record)
    return run.selection.judge(run.progress.epoch, record)


def result_of(run: RunState) -> TrainResult:
    """The run's result from its progress: the best epoch's validation scores are the selection set's 'after'
    figures, and the headline ones until a test split replaces them (loop._finish)."""
    p, opt, sel = run.progress, run.opt, run.selection
    best_epoch = sel.best_epoch
    best = p.history[best_epoch - 1] if best_epoch else p.before
    after = {k: v for k, v in best.items() if "/" in k}
    result = TrainResult(best_epoch, sel.metric, p.before, after, p.history,
                         skipped_images=len(p.bad_pairs), skipped_steps=p.skipped_steps,
                         wise_ft_alpha=opt.wise_ft_alpha, scored_on="selection" if p.before else "none",
                         selection={"before": p.before, "after": after} if p.before else {}, notes=list(run.notes))
    if not result.improved:
        result.note = no_gain_note(opt, sel, p.before.get(sel.metric, math.nan), len(p.history))
    return result


def no_gain_note(opt: OptimisationSection, sel: Selection, base_score: float, epochs: int) -> str:
    """What to say, and what to change, when no epoch beat the base model."""
    return (f"no epoch beat the base model on {sel.metric} ({base_score:.4f}) in {epochs} epochs: "
            f"the saved weights are the base model's. Train longer (num_epochs, now {opt.num_epochs}; "
            f"early_stopping_epochs, now {sel.patience}), raise learning_rate (now "
            f"{opt.learning_rate:g}; fine-tuning a pretrained CLIP works at 1e-7 to 5e-6, a random init needs far "
            "more), or check that the validation captions describe their images"
            + _ceiling_hint(sel.metric, base_score))


CEILING = 0.9  # a base score this close to the best possible 1 leaves early stopping little to see


def _ceiling_hint(metric: str, base_score: float) -> str:
    """Few distinct captions (a class folder of few classes: one caption per class) put MRR near 1 before any
    training, so no epoch can beat it by much and early stopping ends the run on noise."""
    if not base_score >= CEILING or metric.endswith(("/map", "/r_precision")):
        return ""
    return (f"; the base model already scores {base_score:.2f} of at most 1 on {metric}, which "
            "happens with few distinct captions (e.g. few classes): select on text_to_image/map "
            "(early_stopping_metric), which counts every image of a class, or set early_stopping false")
