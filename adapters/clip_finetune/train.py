"""The fine-tuning loop: symmetric contrastive loss, AdamW, warmup + decay, best-epoch selection."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import FinetuneConfig
from .datasets import PairDataset, collate_skipping_bad, default_num_workers
from .errors import ConfigError, DataError
from .evaluate import evaluate
from .model import ClipModel, load_model, save_artifact, unwrap
from .pairs import CaptionPair

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
MAX_LOGIT_SCALE = math.log(100)  # as in CLIP: the temperature may not go below 1/100


@dataclass
class TrainResult:
    """What a run produced: the best epoch, metrics before and after, and the per-epoch history."""

    best_epoch: int  # 0 means no epoch beat the base model; the saved weights are then the base's
    metric: str
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    out_dir: Path | None = None
    skipped_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best_epoch": self.best_epoch,
            "before": self.before,
            "after": self.after,
            "history": self.history,
            "skipped_images": self.skipped_images,
        }


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return the generator that orders the training batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, norms and the logit scale (as open_clip's trainer)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_steps(cfg: FinetuneConfig, total_steps: int) -> int:
    """Warmup length: a fraction of the run when `warmup` < 1, else that many steps (at most the run)."""
    steps = round(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    return min(steps, total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int) -> LRScheduler:
    """Linear warmup from ~0 to the peak learning rate, then cosine / linear decay to 0, or constant."""
    warm = warmup_steps(cfg, total_steps)
    rest = max(1, total_steps - warm)
    if cfg.lr_schedule == "cosine":
        decay: LRScheduler = CosineAnnealingLR(optimizer, T_max=rest, eta_min=0.0)
    elif cfg.lr_schedule == "linear":
        decay = LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=rest)
    else:
        decay = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warm == 0:
        return decay
    ramp = LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    return SequentialLR(optimizer, [ramp, decay], milestones=[warm])


def resolve_precision(cfg: FinetuneConfig, device: torch.device) -> str:
    """The precision actually used: fp32 on CPU; on CUDA, 'auto' means bf16 if supported, else fp16."""
    if device.type != "cuda":
        return "fp32"
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cfg.precision


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def check_sizes(cfg: FinetuneConfig, n_train: int) -> None:
    """Reject a run that cannot make one full contrastive batch before any work is done."""
    if n_train == 0:
        raise DataError("the training set has no usable image-caption pairs")
    if cfg.train_batch_size > n_train:
        raise ConfigError(
            f"train_batch_size: {cfg.train_batch_size} is larger than the training set ({n_train} pairs); "
            f"set it to at most {n_train}"
        )


def fit(
    cfg: FinetuneConfig,
    train_pairs: Sequence[CaptionPair],
    val_pairs: Sequence[CaptionPair] | None = None,
    out_dir: str | Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    clip: ClipModel | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune a CLIP model on `train_pairs`; pick the best epoch on `val_pairs`.

    The best epoch's weights (by `cfg.early_stopping_metric` on validation) end up in `clip.model` and,
    when `out_dir` is given, in an open_clip local-dir artifact there with finetune_config.json and
    metrics.json. Without validation pairs the last epoch counts as the best and nothing stops early.
    `on_epoch_end(epoch, record)` is called after every epoch with loss, learning rate and metrics.
    """
    check_sizes(cfg, len(train_pairs))
    generator = seed_everything(cfg.seed)
    clip = clip or load_model(cfg)
    device, precision = clip.device, resolve_precision(cfg, clip.device)
    model = clip.model

    # data: each caption tokenized once; batches shuffled by a seeded generator; partial batch dropped
    loader = DataLoader(
        PairDataset(train_pairs, clip.preprocess_train, clip.tokenizer),
        batch_size=cfg.train_batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=default_num_workers(cfg.num_workers, device),
        collate_fn=collate_skipping_bad,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    total_steps = cfg.num_epochs * len(loader)

    # optimisation: AdamW (fused on CUDA), warmup + decay, open_clip's symmetric contrastive loss
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=cfg.betas,
        eps=cfg.epsilon,
        fused=device.type == "cuda",
    )
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = open_clip.ClipLoss()

    def validate() -> dict[str, float]:
        return evaluate(clip, val_pairs, cfg.batch_size, cfg.num_workers) if val_pairs else {}

    before = validate()
    metric = cfg.early_stopping_metric
    best_score = before.get(metric, -math.inf)
    best_epoch, best_state, stale = 0, _cpu_state(model) if val_pairs else None, 0
    history: list[dict[str, float]] = []
    skipped = 0
    log.info("training %d pairs, %d steps/epoch, %d epochs, %s on %s", len(train_pairs), len(loader),
             cfg.num_epochs, precision, device)

    for epoch in range(1, cfg.num_epochs + 1):
        # one pass over the training data
        model.train()
        t0, losses = time.perf_counter(), []
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.num_epochs}", unit="batch", disable=not progress)
        for batch, n_bad in bar:
            skipped += n_bad
            if batch is None or len(batch[0]) < 2:  # a contrastive step needs two pairs or more
                continue
            images, tokens, _ = batch
            images = images.to(device, non_blocking=True)
            tokens = tokens.to(device, non_blocking=True)
            with _autocast(device, precision):
                image_features, text_features, logit_scale = model(images, tokens)[:3]
                loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

        # validation, best-epoch bookkeeping, early stopping
        scores = validate()
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else math.nan,
                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0, **scores}
        history.append(record)
        improved = not val_pairs or scores[metric] > best_score
        if improved:
            best_score, best_epoch, stale = scores.get(metric, math.nan), epoch, 0
            best_state = _cpu_state(model) if val_pairs else None
        else:
            stale += 1
        log.info("epoch %d: loss %.4f, %s %.4f%s", epoch, record["train_loss"], metric,
                 scores.get(metric, math.nan), " (best)" if improved else "")
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if val_pairs and cfg.early_stopping and stale >= cfg.early_stopping_epochs:
            log.info("early stopping: no %s gain for %d epochs", metric, stale)
            break

    # keep the best epoch's weights (not the last epoch's) and write them out
    if best_state is not None:
        unwrap(model).load_state_dict(best_state)
    after = history[best_epoch - 1] if best_epoch else {**before, "epoch": 0}
    after = {k: v for k, v in after.items() if "/" in k}
    result = TrainResult(best_epoch, metric, before, after, history, skipped_images=skipped)
    if best_epoch == 0:
        log.warning("no epoch beat the base model on %s; keeping the base weights", metric)
    if out_dir is not None:
        result.out_dir = save_artifact(clip, out_dir, cfg, result.to_dict())
    return result


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in copy.copy(unwrap(model).state_dict()).items()}
