"""What trains and how: sizes checked before any work, tower locks, AdamW parameter groups, the learning-rate
schedule (linear warmup, then cosine / linear decay, or constant)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from ..errors import ConfigError, DataError
from ..sections import ModelSection, OptimisationSection

log = logging.getLogger(__name__)


MIN_USEFUL_STEPS = 50  # fewer optimisation steps barely move a pretrained model at fine-tuning learning rates


def check_sizes(opt: OptimisationSection, n_train: int, world_size: int = 1) -> int:
    """The train_batch_size that fits the training set, checked before any work: one larger than the set is
    lowered to it (to a multiple of processes x accum_freq, with a warning); a batch that cannot be split evenly,
    or a set too small for one contrastive batch, is an error."""
    if n_train == 0:
        raise DataError("the training set has no usable image-caption pairs")
    unit = world_size * opt.accum_freq
    size = opt.train_batch_size
    if size > n_train:
        fitted = n_train // unit * unit
        if fitted < max(2, unit):
            raise ConfigError(f"train_batch_size: the training set ({n_train} pairs) is too small for one batch of "
                              f"at least {max(2, unit)} pairs ({world_size} processes x accum_freq {opt.accum_freq})")
        log.warning("train_batch_size %d is larger than the training set (%d pairs): using %d", size, n_train, fitted)
        size = fitted
    if size % unit:
        raise ConfigError(
            f"train_batch_size: {size} pairs cannot be split evenly across {world_size} processes "
            f"x accum_freq {opt.accum_freq}; use a multiple of {unit}"
        )
    return size


def step_budget_note(opt: OptimisationSection, n_train: int, total_steps: int) -> str | None:
    """A warning for a run too short to do anything (it would still look successful), else None."""
    if total_steps >= MIN_USEFUL_STEPS:
        return None
    if opt.max_steps is not None and total_steps == opt.max_steps:
        return (f"only {total_steps} optimisation steps (max_steps): too few to change a pretrained model much; "
                f"raise max_steps (at least {MIN_USEFUL_STEPS} steps)")
    return (f"only {total_steps} optimisation steps ({n_train} pairs in batches of {opt.train_batch_size}, "
            f"{opt.num_epochs} epochs): too few to change a pretrained model much; lower train_batch_size or "
            f"raise num_epochs (at least {MIN_USEFUL_STEPS} steps)")


def apply_locks(model: torch.nn.Module, spec: ModelSection) -> None:
    """Freeze what the configuration locks (open_clip's own tower locks), and turn on gradient checkpointing."""
    if spec.lock_image:
        model.lock_image_tower(unlocked_groups=spec.lock_image_unlocked_groups, freeze_bn_stats=False)
    if spec.lock_text:
        model.lock_text_tower(unlocked_layers=spec.lock_text_unlocked_layers, freeze_layer_norm=True)
    if spec.grad_checkpointing:
        model.set_grad_checkpointing(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable < total:
        log.info("training %d of %d parameters (%.1f%%)", trainable, total, 100 * trainable / total)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, norms and the logit scale (as open_clip's trainer)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: torch.nn.Module, opt: OptimisationSection, device: torch.device
                   ) -> torch.optim.Optimizer:
    """AdamW; the fused kernel where torch has one (on CPU ~8x faster than the per-tensor loop)."""
    return torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.learning_rate, betas=opt.betas,
                             eps=opt.epsilon, fused=device.type in ("cuda", "cpu"))


def warmup_steps(opt: OptimisationSection, total_steps: int) -> int:
    """Warmup length: a fraction of the run when `warmup` < 1 (rounded up: a short run still warms up for a
    step rather than starting at the peak rate), else that many steps (at most the run)."""
    steps = math.ceil(opt.warmup * total_steps - 1e-9) if opt.warmup < 1 else int(opt.warmup)  # 0.1 * 90 is 9.000...2
    return min(steps, total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, opt: OptimisationSection, total_steps: int) -> LRScheduler:
    """Linear warmup from ~0 to the peak learning rate, then cosine / linear decay to 0, or constant."""
    warm = warmup_steps(opt, total_steps)
    rest = max(1, total_steps - warm)
    if opt.lr_schedule == "cosine":
        decay: LRScheduler = CosineAnnealingLR(optimizer, T_max=rest, eta_min=0.0)
    elif opt.lr_schedule == "linear":
        decay = LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=rest)
    else:
        decay = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warm == 0:
        return decay
    ramp = LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    return SequentialLR(optimizer, [ramp, decay], milestones=[warm])
