"""The fine-tuning loop: symmetric contrastive loss, AdamW, warmup + decay, best-epoch selection,
atomic checkpoints with exact resume, and non-finite steps skipped, counted and bounded."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import FinetuneConfig
from ..data.datasets import PairDataset, collate_skipping_bad, default_num_workers, epoch_batches
from ..data.decode_cache import train_cache
from ..data.images import set_max_image_pixels
from ..data.pairs import CaptionPair, DataReport
from ..errors import ClipFinetuneError, ConfigError, DataError
from ..model.clip import ClipModel, atomic_write, cpu_state, load_model, save_artifact, unwrap, wise_ft
from ..retrieval.embed import autocast_for
from ..retrieval.evaluate import evaluate
from .distributed import DistContext, all_gather_lists, broadcast, launch, process_group, resolve_num_processes

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[Path], None]
MAX_LOGIT_SCALE = math.log(100)  # as in CLIP: the temperature may not go below 1/100
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 2
ONNX_DIR = "onnx"  # export_onnx: the ONNX towers go to this folder inside the saved model


class TrainingDiverged(ClipFinetuneError):
    """Too many consecutive steps had a non-finite loss or gradients, or the weights became non-finite."""


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
    skipped_steps: int = 0  # steps with a non-finite loss or gradients, not applied
    wise_ft_alpha: float = 1.0
    after_fine_tuned: dict[str, float] = field(default_factory=dict)  # before WiSE-FT mixing (alpha < 1 only)

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
    history: list[dict[str, float]] = field(default_factory=list)
    bad_pairs: list[int] = field(default_factory=list)  # indices of training pairs whose image failed
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    finished: bool = False

    def skip_step(self) -> None:
        """Count a step whose loss or gradients were non-finite: it was not applied."""
        self.skipped_steps += 1
        self.bad_in_a_row += 1


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (model init; data order and augmentation have their own seeds)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def check_sizes(cfg: FinetuneConfig, n_train: int, world_size: int = 1) -> None:
    """Reject a run that cannot make one full contrastive batch before any work is done."""
    if n_train == 0:
        raise DataError("the training set has no usable image-caption pairs")
    if cfg.train_batch_size > n_train:
        raise ConfigError(
            f"train_batch_size: {cfg.train_batch_size} is larger than the training set ({n_train} pairs); "
            f"set it to at most {n_train}"
        )
    if cfg.train_batch_size % (world_size * cfg.accum_freq):
        raise ConfigError(
            f"train_batch_size: {cfg.train_batch_size} pairs cannot be split evenly across {world_size} processes "
            f"x accum_freq {cfg.accum_freq}; use a multiple of {world_size * cfg.accum_freq}"
        )


def apply_locks(model: torch.nn.Module, cfg: FinetuneConfig) -> None:
    """Freeze what the configuration locks (open_clip's own tower locks), and turn on gradient checkpointing."""
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=False)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable < total:
        log.info("training %d of %d parameters (%.1f%%)", trainable, total, 100 * trainable / total)


def weights_are_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class _Run:
    """The live objects of a run, grouped so checkpoints save and restore them together."""

    cfg: FinetuneConfig
    clip: ClipModel
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    progress: Progress
    checkpoint: Path | None
    ctx: DistContext | None = None  # None: a single process
    train_model: torch.nn.Module | None = None  # the model the steps run (DDP-wrapped in a distributed run)
    base_state: dict[str, torch.Tensor] | None = None  # the starting weights, kept for WiSE-FT (alpha < 1)

    @property
    def is_main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

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
        }
        atomic_write(self.checkpoint, lambda p: torch.save(state, p))
        if on_checkpoint is not None:
            on_checkpoint(self.checkpoint)

    def load_checkpoint(self) -> bool:
        """Restore from the checkpoint file, if there is one (weights_only: no pickled code is run)."""
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ClipFinetuneError(f"{self.checkpoint}: unknown checkpoint version {state.get('version')!r}")
        unwrap(self.clip.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.progress = Progress(**state["progress"])
        if self.base_state is not None:
            self.base_state = state["base"]
        return True

    def sync_bad_pairs(self) -> None:
        """Every rank sees the undecodable images of its own slices: make the list whole on every rank."""
        if self.ctx is not None:
            self.progress.bad_pairs = sorted(set(all_gather_lists(self.progress.bad_pairs)))


def fit(
    cfg: FinetuneConfig,
    train_pairs: Sequence[CaptionPair],
    val_pairs: Sequence[CaptionPair] | None = None,
    out_dir: str | Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    clip: ClipModel | None = None,
    progress: bool = True,
    resume: bool = False,
    on_checkpoint: CheckpointCallback | None = None,
    report: DataReport | None = None,
) -> TrainResult:
    """Fine-tune a CLIP model on `train_pairs`; pick the best epoch on `val_pairs`.

    The best epoch's weights (by `cfg.early_stopping_metric` on validation) end up in `clip.model` and,
    when `out_dir` is given, in an open_clip local-dir artifact there with finetune_config.json and
    metrics.json; the artifact is rewritten at each new best, so a crash keeps the best so far. Without
    validation pairs the last epoch counts as the best and nothing stops early. With `cfg.wise_ft_alpha`
    below 1 the saved weights are that mix of the best epoch's and the starting weights (WiSE-FT).

    With `out_dir`, out_dir/checkpoint.pt holds the whole training state, written atomically at every
    epoch end and every `cfg.checkpoint_every_steps` steps (`on_checkpoint(path)` is called after each
    write); `resume=True` continues from it exactly (on CPU the weights equal an uninterrupted run's).
    A run that completes deletes its checkpoint.
    Images that cannot be decoded are skipped and counted in `report` (reason, example item ids).

    Distributed (distributed.py): under torchrun every rank calls fit(); rank 0 evaluates, writes and calls
    the callbacks, and its result is the run's. Outside torchrun, `cfg.num_processes` > 1 (or null with
    several GPUs) makes this call spawn the other ranks and train as rank 0.
    """
    if cfg.export_onnx:  # missing packages fail now, not after the training
        from ..model.onnx_export import require_exporter

        require_exporter()
    ctx = DistContext.from_env()
    if ctx is None:
        # a launcher's single process (torchrun --nproc_per_node 1) sets RANK: it asked for one process
        nprocs = 1 if "RANK" in os.environ else resolve_num_processes(cfg.num_processes, cfg.device)
        if nprocs > 1:
            check_sizes(cfg, len(train_pairs), nprocs)
            set_max_image_pixels(cfg.max_image_pixels)
            seed_everything(cfg.seed)
            clip = clip or load_model(cfg, "cpu")
            return launch(nprocs, cfg, train_pairs, val_pairs, clip, out_dir, on_epoch_end=on_epoch_end,
                          progress=progress, resume=resume, on_checkpoint=on_checkpoint, report=report)
        return _fit(cfg, train_pairs, val_pairs, out_dir, on_epoch_end, clip, progress, resume, on_checkpoint, report)
    device = ctx.device(cfg.device)
    with process_group(ctx, device):
        return _fit(cfg, train_pairs, val_pairs, out_dir, on_epoch_end if ctx.is_main else None, clip,
                    progress and ctx.is_main, resume, on_checkpoint if ctx.is_main else None,
                    report if ctx.is_main else None, ctx, device)


def _fit(
    cfg: FinetuneConfig,
    train_pairs: Sequence[CaptionPair],
    val_pairs: Sequence[CaptionPair] | None,
    out_dir: str | Path | None,
    on_epoch_end: EpochCallback | None,
    clip: ClipModel | None,
    progress: bool,
    resume: bool,
    on_checkpoint: CheckpointCallback | None,
    report: DataReport | None,
    ctx: DistContext | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    world = ctx.world_size if ctx is not None else 1
    check_sizes(cfg, len(train_pairs), world)
    set_max_image_pixels(cfg.max_image_pixels)
    seed_everything(cfg.seed)
    clip = clip or load_model(cfg, device)
    if device is not None:
        clip.model.to(device)
    device, precision = clip.device, resolve_precision(cfg, clip.device)
    model = clip.model
    apply_locks(unwrap(model), cfg)
    batches_per_epoch = len(train_pairs) // cfg.train_batch_size
    total_steps = cfg.num_epochs * batches_per_epoch
    workers = default_num_workers(cfg.num_workers, device, ctx.local_world_size if ctx is not None else 1)
    dataset = PairDataset(train_pairs, clip.preprocess_train, clip.tokenizer, seed=cfg.seed,
                          cache=train_cache(clip.preprocess_train, cfg.image_cache_mb, workers))
    out = Path(out_dir) if out_dir is not None else None
    is_main = ctx is None or ctx.is_main
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)

    # optimisation: AdamW (fused kernel: on CPU ~8x faster than the default per-tensor loop), warmup + decay,
    # open_clip's symmetric contrastive loss; with several processes, each rank's features are gathered with
    # gradients so every pair meets the negatives of the whole global batch (local_loss: each rank computes
    # the rows of its own pairs; the mean over ranks is the single-process loss)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=cfg.betas,
                                  eps=cfg.epsilon, fused=device.type in ("cuda", "cpu"))
    train_model = model
    if ctx is not None:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    run = _Run(cfg, clip, optimizer, make_scheduler(optimizer, cfg, total_steps),
               torch.amp.GradScaler(device.type, enabled=precision == "fp16"), Progress(),
               out / CHECKPOINT_NAME if out is not None else None, ctx, train_model,
               cpu_state(model) if cfg.wise_ft_alpha < 1 and is_main else None)
    loss_fn = open_clip.ClipLoss(local_loss=ctx is not None, gather_with_grad=ctx is not None, cache_labels=True,
                                 rank=ctx.rank if ctx else 0, world_size=world)

    def validate() -> dict[str, float]:
        """The validation metrics (computed on rank 0, sent to all ranks so their bookkeeping agrees)."""
        if not val_pairs:
            return {}
        scores: dict[str, float] | None = None
        if is_main:
            if not weights_are_finite(unwrap(model)):
                raise _diverged(cfg, run, "the weights became non-finite")
            scores = evaluate(clip, val_pairs, cfg.batch_size, cfg.num_workers)
        return broadcast(scores) if ctx is not None else scores

    if resume and not (run.checkpoint and run.checkpoint.is_file()):
        log.warning("nothing to resume: no %s in %s; starting from the beginning", CHECKPOINT_NAME, out)
    if resume and run.load_checkpoint():
        log.info("resuming from %s: epoch %d, batch %d", run.checkpoint, run.progress.epoch, run.progress.batches_done)
        # the best weights so far (the base's until an epoch beats it) are the artifact in out_dir
        best_state = _cpu_state_from_artifact(out) if val_pairs and is_main else None
    else:
        if run.checkpoint is not None and run.checkpoint.is_file() and is_main:
            log.warning("%s exists: starting over (resume=True continues it)", run.checkpoint)
        run.progress.before = validate()
        run.progress.best_score = run.progress.before.get(cfg.early_stopping_metric, -math.inf)
        best_state = cpu_state(model) if val_pairs and is_main else None
        if out is not None and val_pairs and is_main:  # the base is the best so far: a crash from here keeps a model
            save_artifact(clip, out, cfg)
    p = run.progress
    log.info("training %d pairs, %d steps/epoch, %d epochs, %s on %s%s", len(train_pairs), batches_per_epoch,
             cfg.num_epochs, precision, device, f", {world} processes" if ctx is not None else "")

    while p.epoch <= cfg.num_epochs and not p.finished:
        # one pass over the training data (from where a resumed run stopped)
        train_model.train()
        t0 = time.perf_counter() - p.epoch_seconds
        batches = epoch_batches(len(train_pairs), cfg.train_batch_size, cfg.seed, p.epoch)[p.batches_done:]
        if ctx is not None:  # this rank's slice of each global batch
            per = cfg.train_batch_size // world
            batches = [b[ctx.rank * per : (ctx.rank + 1) * per] for b in batches]
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skipping_bad,
                            num_workers=workers,
                            pin_memory=device.type == "cuda")
        bar = tqdm(loader, desc=f"epoch {p.epoch}/{cfg.num_epochs}", unit="batch", disable=not progress,
                   initial=p.batches_done, total=batches_per_epoch)
        for batch, bad in bar:
            for b in bad:  # each undecodable pair is met once per epoch: count it once
                if b.index not in p.bad_pairs:
                    p.bad_pairs.append(b.index)
                    _report_bad(report, train_pairs[b.index], b.reason)
            loss = _train_step(run, loss_fn, batch, precision)
            p.batches_done += 1
            p.global_step += 1
            if loss is not None and math.isfinite(loss):
                p.loss_sum, p.loss_count = p.loss_sum + loss, p.loss_count + 1
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
            if p.bad_in_a_row >= cfg.max_bad_steps:
                raise _diverged(cfg, run, f"{p.bad_in_a_row} consecutive steps had a non-finite loss or gradients")
            if cfg.checkpoint_every_steps and p.global_step % cfg.checkpoint_every_steps == 0:
                p.epoch_seconds = time.perf_counter() - t0
                run.sync_bad_pairs()
                run.save_checkpoint(on_checkpoint)

        # validation, best-epoch bookkeeping, early stopping
        run.sync_bad_pairs()
        scores = validate()
        metric = cfg.early_stopping_metric
        record = {"epoch": p.epoch, "train_loss": p.loss_sum / p.loss_count if p.loss_count else math.nan,
                  "lr": run.scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0, **scores}
        p.history.append(record)
        improved = not val_pairs or scores[metric] > p.best_score  # NaN never improves
        if improved:
            p.best_score, p.best_epoch, p.stale = scores.get(metric, math.nan), p.epoch, 0
            if val_pairs and is_main:
                best_state = cpu_state(model)
                if out is not None:
                    save_artifact(clip, out, cfg, {"best_epoch": p.epoch, "history": p.history})
        else:
            p.stale += 1
        log.info("epoch %d: loss %.4f, %s %.4f%s", p.epoch, record["train_loss"], metric,
                 scores.get(metric, math.nan), " (best)" if improved else "")
        stop = bool(val_pairs) and cfg.early_stopping and p.stale >= cfg.early_stopping_epochs
        if stop:
            log.info("early stopping: no %s gain for %d epochs", metric, p.stale)
        p.epoch, p.batches_done, p.loss_sum, p.loss_count, p.epoch_seconds = p.epoch + 1, 0, 0.0, 0, 0.0
        p.finished = stop or p.epoch > cfg.num_epochs
        run.save_checkpoint(on_checkpoint)
        if on_epoch_end is not None:
            on_epoch_end(int(record["epoch"]), record)

    # keep the best epoch's weights (not the last epoch's), mixed with the base's for WiSE-FT, and write them out
    if best_state is not None:
        unwrap(model).load_state_dict(best_state)
    best = p.history[p.best_epoch - 1] if p.best_epoch else p.before
    after = {k: v for k, v in best.items() if "/" in k}
    result = TrainResult(p.best_epoch, cfg.early_stopping_metric, p.before, after, p.history,
                         skipped_images=len(p.bad_pairs), skipped_steps=p.skipped_steps,
                         wise_ft_alpha=cfg.wise_ft_alpha)
    if p.best_epoch == 0:
        log.warning("no epoch beat the base model on %s; keeping the base weights", cfg.early_stopping_metric)
    if p.skipped_steps:
        log.warning("%d steps had a non-finite loss or gradients and were skipped", p.skipped_steps)
    if run.base_state is not None and is_main:
        unwrap(model).load_state_dict(wise_ft(run.base_state, cpu_state(model), cfg.wise_ft_alpha))
        if val_pairs:
            result.after_fine_tuned, result.after = after, evaluate(clip, val_pairs, cfg.batch_size, cfg.num_workers)
        log.info("WiSE-FT: saved weights are %.2f x fine-tuned + %.2f x base", cfg.wise_ft_alpha, 1 - cfg.wise_ft_alpha)
    if out is not None and is_main:
        result.out_dir = save_artifact(clip, out, cfg, result.to_dict())
        if cfg.export_onnx:
            from ..model.onnx_export import export_onnx

            export_onnx(clip, out / ONNX_DIR)
        # the run is complete: its resume state (weights + optimizer, ~3x the model) has no further use
        run.checkpoint.unlink(missing_ok=True)
    elif cfg.export_onnx and out is None:
        log.warning("export_onnx: no output folder to export to; call onnx_export.export_onnx(model, folder)")
    return result


def _train_step(run: _Run, loss_fn: Callable, batch: Any, precision: str) -> float | None:
    """One optimisation step; a non-finite loss or gradient norm skips the update and is counted.

    With `accum_freq` k > 1 the batch runs as k micro-batches with open_clip's feature caching: a no-grad
    pass computes every micro-batch's features, then each micro-batch is recomputed with gradients and its
    features put in place of the cached ones, so each backward is of the loss over the whole batch; the
    summed gradients are the whole batch's (the logit scale, which does not go through the features, takes
    its gradient from one of the k passes only). In a distributed run, all ranks take the same decisions:
    the batch is trimmed to the smallest rank's (after undecodable images), the loss is the mean over ranks.
    """
    model, device, p, ctx = run.train_model, run.clip.device, run.progress, run.ctx
    images, tokens = (batch[0], batch[1]) if batch is not None else (None, None)
    n = len(images) if images is not None else 0
    if ctx is not None:  # every rank must feed the same number of pairs to the gathered loss
        size = torch.tensor([n], device=device)
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MIN)
        n = int(size.item())
    k = min(run.cfg.accum_freq, n)
    if n * (ctx.world_size if ctx else 1) < 2 or k < 1:
        return None  # a contrastive step needs two pairs
    images = images[:n].to(device, non_blocking=True)
    tokens = tokens[:n].to(device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    if k == 1:
        with autocast_for(device, precision):
            image_features, text_features, logit_scale = model(images, tokens)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        value = _global_loss(loss.detach(), ctx)
        if not math.isfinite(value):
            p.skip_step()
            return None
        run.scaler.scale(loss).backward()
    else:
        image_chunks, token_chunks = images.chunk(k), tokens.chunk(k)
        k = len(image_chunks)  # chunk() makes fewer pieces when k does not divide a trimmed batch
        with torch.no_grad(), autocast_for(device, precision):
            cached = [model(i, t)[:2] for i, t in zip(image_chunks, token_chunks, strict=True)]
            cached_images, cached_texts = [c[0] for c in cached], [c[1] for c in cached]
            loss = loss_fn(torch.cat(cached_images), torch.cat(cached_texts), unwrap(model).logit_scale.exp())
        value = _global_loss(loss, ctx)
        if not math.isfinite(value):
            p.skip_step()
            return None
        for j in range(k):
            last = j == k - 1
            # DDP all-reduces gradients at the last micro-batch only
            sync = model.no_sync() if ctx is not None and not last else nullcontext()
            with sync:
                with autocast_for(device, precision):
                    image_j, text_j, logit_scale = model(image_chunks[j], token_chunks[j])[:3]
                    all_images = torch.cat([*cached_images[:j], image_j, *cached_images[j + 1 :]])
                    all_texts = torch.cat([*cached_texts[:j], text_j, *cached_texts[j + 1 :]])
                    micro_loss = loss_fn(all_images, all_texts, logit_scale if last else logit_scale.detach())
                run.scaler.scale(micro_loss).backward()
    run.scaler.unscale_(run.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.grad_clip_norm or math.inf)
    # with fp16 the GradScaler itself skips steps whose gradients overflowed (and lowers its scale)
    if not torch.isfinite(norm) and not run.scaler.is_enabled():
        run.optimizer.zero_grad(set_to_none=True)
        p.skip_step()
        return None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    p.bad_in_a_row = 0
    return value


def _global_loss(loss: torch.Tensor, ctx: DistContext | None) -> float:
    """The step's loss as a number: the mean over ranks (non-finite if any rank's is, so all skip together)."""
    if ctx is None:
        return loss.item()
    total = loss.detach().float().clone()
    torch.distributed.all_reduce(total)
    return total.item() / ctx.world_size


def _report_bad(report: DataReport | None, pair: CaptionPair, reason: str) -> None:
    if report is not None:
        report.skip(reason, pair.item_id or pair.image)
        report.used -= 1


def _diverged(cfg: FinetuneConfig, run: _Run, what: str) -> TrainingDiverged:
    p = run.progress
    kept = f"the last good checkpoint is kept in {run.checkpoint}" if run.checkpoint else "no checkpoint was kept"
    return TrainingDiverged(
        f"training diverged at epoch {p.epoch}, step {p.global_step}: {what}; {kept}. Likely causes: "
        f"learning_rate {cfg.learning_rate:g} too high (fine-tuning recipes use 1e-7 to 5e-6), or fp16 "
        f"overflow (set precision to 'bf16' or 'fp32')"
    )


def _cpu_state_from_artifact(folder: Path | None) -> dict[str, torch.Tensor] | None:
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME
    from safetensors.torch import load_file

    path = folder / HF_SAFE_WEIGHTS_NAME if folder is not None else None
    return load_file(str(path)) if path is not None and path.is_file() else None
