"""The training loop of one process (one rank of a distributed run): set up, evaluate the base model (or
resume), train epoch by epoch with validation, best-epoch selection and early stopping, then keep the best
weights (mixed with the base's for WiSE-FT) and write them out."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch.utils.data import DataLoader

from ..config import FinetuneConfig
from ..data.datasets import PairDataset, collate_skipping_bad, default_num_workers
from ..data.decode_cache import train_cache
from ..data.identity import normalise_caption, pair_keys
from ..data.load import TRAIN, Splits
from ..errors import DataError
from ..machine import seed_everything
from ..model.clip import ClipModel, load_model, save_artifact
from ..model.compiling import compile_module
from ..model.weights import cpu_state, unwrap
from ..progress import progress as show_progress
from ..retrieval.eval_cache import EvalCache, eval_cache_for
from ..retrieval.evaluate import evaluate
from ..retrieval.evaluation_result import EvaluationResult
from ..sections import OptimisationSection
from .checkpoint import RunMismatch
from .checkpoint import load as load_checkpoint
from .checkpoint import save as save_checkpoint
from .distributed import DistContext, broadcast, process_group
from .guard import identity_differences, require_locked_folder, run_identity
from .loss import ContrastiveLoss
from .optim import apply_locks, make_optimizer, make_scheduler, step_budget_note
from .retention import check_retention, keeps_base, mix_with_base, retention_cache, score_retention
from .run_files import (
    ONNX_DIR,
    UNMIXED_BEST_NAME,
    best_so_far,
    clear_previous_run,
    drop_unfinished_model,
    keep_unmixed_best,
    model_stamp,
    write_per_query,
)
from .sampler import batch_sampler
from .selection import Selection
from .state import (
    CHECKPOINT_NAME,
    CheckpointCallback,
    Progress,
    RunState,
    TrainResult,
    epoch_record,
    judge_epoch,
    result_of,
    weights_are_finite,
)
from .step import train_step

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class Hooks:
    """What the caller hears of a run: after each epoch, after each checkpoint write, and a progress bar.
    In a distributed run only rank 0 calls them."""

    on_epoch_end: EpochCallback | None = None
    on_checkpoint: CheckpointCallback | None = None
    progress: bool = True


def train_rank(cfg: FinetuneConfig, splits: Splits, out_dir: str | Path | None, clip: ClipModel | None,
               hooks: Hooks, resume: bool, ctx: DistContext | None = None) -> TrainResult:
    """Train in this process: alone (ctx None), or as one rank of a distributed run (joining its group)."""
    if ctx is None:
        return _train(cfg, splits, out_dir, clip, hooks, resume, None, None)
    device = ctx.device(cfg.device)
    with process_group(ctx, device):
        return _train(cfg, splits, out_dir, clip, hooks if ctx.is_main else Hooks(progress=False), resume, ctx,
                      device)


def _train(cfg: FinetuneConfig, splits: Splits, out_dir: str | Path | None, clip: ClipModel | None, hooks: Hooks,
           resume: bool, ctx: DistContext | None, device: torch.device | None) -> TrainResult:
    run, dataset = _setup(cfg, splits, out_dir, clip, ctx, device, hooks.progress)
    cfg = run.cfg  # train_batch_size fitted to the data
    loss_fn = _make_loss(unwrap(run.clip.model), cfg.duplicate_aware_loss, ctx.rank if ctx else 0, run.world_size)
    out = Path(out_dir) if out_dir is not None else None
    stamp = model_stamp(out)
    try:
        best_state = _start(run, splits, out, resume, hooks.progress)
        log.info("training %d pairs, %d steps/epoch, %d epochs, %s on %s%s", len(splits.train),
                 len(splits.train) // cfg.train_batch_size, cfg.num_epochs, run.precision, run.clip.device,
                 f", {run.world_size} processes" if ctx is not None else "")
        best_state = _epochs(run, dataset, loss_fn, splits, hooks, out, best_state)
        return _finish(run, splits, out, best_state)
    except BaseException:  # a full disk, a diverged run, Ctrl-C: no model that looks finished without its checkpoint
        if out is not None and run.is_main:
            drop_unfinished_model(run, out, stamp)
        raise


def _check_progress(run: RunState, n_pairs: int) -> None:
    """RunMismatch for a checkpoint whose progress cannot be this run's (damaged, or written by hand): training
    pairs out of range would fail at the end of the run (the data report names each), a negative position now."""
    p = run.progress
    bad = [i for i in p.bad_pairs if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_pairs]
    if bad or p.epoch < 1 or p.batches_done < 0:
        what = f"training pairs out of range ({bad[:3]} of {n_pairs})" if bad else \
            f"epoch {p.epoch}, batch {p.batches_done}"
        raise RunMismatch(f"{str(run.checkpoint)!r} records {what}: it is damaged; start over without resuming, or "
                          "delete it")


def _epochs(run: RunState, dataset: PairDataset, loss_fn: Callable, splits: Splits, hooks: Hooks, out: Path | None,
            best_state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Train epoch after epoch until the last or early stopping; returns the best weights (rank 0)."""
    cfg, p = run.cfg, run.progress
    while p.epoch <= cfg.num_epochs and not p.finished:
        started = time.perf_counter() - p.epoch_seconds
        _train_epoch(run, dataset, loss_fn, splits, hooks, started)
        record = epoch_record(run, _validate(run, splits, hooks.progress), time.perf_counter() - started)
        improved, stop = judge_epoch(run, record)
        if cfg.max_steps is not None and p.global_step >= cfg.max_steps:
            log.info("max_steps: %d optimisation steps done; stopping after epoch %d", p.global_step, p.epoch)
            stop = True
        if improved and splits.validation and run.is_main:
            best_state = cpu_state(run.clip.model)
            if out is not None:
                require_locked_folder(out)
                save_artifact(run.clip, out, cfg, {"best_epoch": p.epoch, "history": p.history})
                write_per_query(run.evaluation, out)  # this epoch's validation
        p.next_epoch(stop, cfg.num_epochs)
        _save_checkpoint(run, hooks)
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(int(record["epoch"]), record)
    return best_state


def _make_loss(model: torch.nn.Module, duplicate_aware: bool, rank: int, world_size: int) -> ContrastiveLoss:
    """The loss `model` was made for: open_clip's SigLipLoss when it has a logit_bias (SigLIP), else its ClipLoss
    (with several processes: local loss over features gathered with gradients, as open_clip's trainer)."""
    if getattr(model, "logit_bias", None) is not None:
        return ContrastiveLoss(open_clip.loss.SigLipLoss(rank=rank, world_size=world_size), True, duplicate_aware, rank,
                               world_size)
    distributed = world_size > 1
    base = open_clip.ClipLoss(local_loss=distributed, gather_with_grad=distributed, cache_labels=True, rank=rank,
                              world_size=world_size)
    return ContrastiveLoss(base, False, duplicate_aware, rank, world_size)


def _setup(cfg: FinetuneConfig, splits: Splits, out_dir: str | Path | None, clip: ClipModel | None,
           ctx: DistContext | None, device: torch.device | None, progress: bool) -> tuple[RunState, PairDataset]:
    """Seed, build the model, its optimizer, schedule and dataset, before any training. `cfg` is fitted to the
    data already (fit.plan_run: sizes checked and settings applied once per run); the seeds are set again here
    because loading and scoring the base model before the run draws from them."""
    seed_everything(cfg.seed)
    clip = clip or load_model(cfg.model, device or cfg.device, cfg.seed)
    if device is not None:
        clip.model.to(device)
    clip.use_precision(cfg.precision)  # for the device it trains on (evaluation: clip.inference_precision)
    model, device = clip.model, clip.device
    apply_locks(unwrap(model), cfg.model)
    workers = default_num_workers(cfg.num_workers, device, ctx.local_world_size if ctx is not None else 1)
    is_main = ctx is None or ctx.is_main
    eval_cache, train_mb = None, float(cfg.image_cache_mb)
    if splits.validation and is_main:  # rank 0 evaluates; its validation inputs come out of the same budget
        eval_cache, train_mb = eval_cache_for(cfg.runtime, clip, len({p.image for p in splits.validation}))
    ret_cache, train_mb = retention_cache(cfg, clip, splits.retention if is_main else None, train_mb)
    dataset = PairDataset(splits.train, clip.preprocess_train, clip.tokenizer, seed=cfg.seed,
                          cache=train_cache(clip.preprocess_train, train_mb, workers), progress=progress)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
    opt = cfg.optimisation  # the section, built once for the run
    optimizer = make_optimizer(model, opt, device)
    precision = clip.precision
    train_model = model
    if ctx is not None:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = compile_module(train_model, "the training model")
    total_steps = cfg.num_epochs * (len(splits.train) // cfg.train_batch_size)
    if cfg.max_steps is not None:  # the schedule (warmup, decay) ends where the run will
        total_steps = min(total_steps, cfg.max_steps)
    keys = pair_keys(splits.train) if cfg.duplicate_aware_loss or cfg.unique_batches or cfg.hard_negatives else None
    run = RunState(
        cfg=cfg, opt=opt, clip=clip, optimizer=optimizer, scheduler=make_scheduler(optimizer, opt, total_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"), progress=Progress(),
        selection=Selection.of(cfg.selection, has_validation=bool(splits.validation)),
        sampler=batch_sampler(cfg, splits.train, clip, keys, workers, ctx),  # hard negatives: mined by `clip`
        checkpoint=out / CHECKPOINT_NAME if out is not None else None, train_model=train_model, precision=precision,
        ctx=ctx, base_state=cpu_state(model) if keeps_base(cfg, splits) and is_main else None, num_workers=workers,
        identity=run_identity(cfg, splits) if out is not None else None, keys=keys,
        notes=_notes(opt, splits, total_steps) if is_main else [], eval_cache=eval_cache,
        retention_cache=ret_cache)
    return run, dataset


def _notes(opt: OptimisationSection, splits: Splits, total_steps: int) -> list[str]:
    """What the result's reader should know about its figures and its budget (also logged)."""
    notes = [note] if (note := step_budget_note(opt, len(splits.train), total_steps)) else []
    if len({normalise_caption(p.caption) for p in splits.train}) == 1 and len(splits.train) > 1:
        notes.append(f"only one distinct caption in the {len(splits.train)} training pairs: contrastive training has "
                     "nothing to tell apart (the loss falls to 0 and retrieval learns nothing); give the images "
                     "their own captions, or labels of at least two classes")
    if splits.held_out:
        notes.append(f"no validation data was given: {len(splits.validation or [])} pairs were held out of the "
                     "training data to pick the best epoch")
    if splits.test:
        notes.append(f"'after' is the test split ({len(splits.test)} pairs), scored once at the end; it chose "
                     "nothing")
        if "also in validation" in (test_note := splits.report("test").note):  # drop_train_overlap: false
            notes.append(f"only part of the test split is unseen ({test_note}): its 'after' is partly scored on "
                         "pairs that picked the epoch, which flatters the model")
    elif splits.validation:
        notes.append(f"'after' is the selection set ({len(splits.validation)} pairs), which also picked the best "
                     "epoch, so it flatters the model; a test split gives an unbiased figure")
    else:
        notes.append("no validation data (none given, none held out): nothing picks the best epoch or stops early; "
                     "the last epoch's weights are saved and there is no 'after' figure")
    for note in notes:
        log.log(logging.WARNING if note.startswith(("only", "no validation")) else logging.INFO, note)
    return notes


def _start(run: RunState, splits: Splits, out: Path | None, resume: bool, progress: bool
           ) -> dict[str, torch.Tensor] | None:
    """Resume from the checkpoint, or score the base model; returns the best weights so far (rank 0)."""
    keep_best = bool(splits.validation) and run.is_main
    if resume and not (run.checkpoint and run.checkpoint.is_file()):
        log.warning("nothing to resume: no %s in %s; starting from the beginning", CHECKPOINT_NAME, out)
    if resume and load_checkpoint(run, lambda theirs: identity_differences(theirs, run.identity)):
        _check_progress(run, len(splits.train))
        log.info("resuming from %s: epoch %d, batch %d", run.checkpoint, run.progress.epoch,
                 run.progress.batches_done)
        # the best weights so far (the base's until an epoch beats it) are the artifact in out_dir, unless a
        # WiSE-FT run stopped after writing its mix: then the unmixed best kept beside it (mixed once, in _finish)
        return best_so_far(out) if keep_best else None
    if run.checkpoint is not None and run.checkpoint.is_file() and run.is_main:
        log.warning("%s exists: starting over (resume=True continues it)", run.checkpoint)
    if out is not None and run.is_main:
        clear_previous_run(out)
    run.progress.before = _validate(run, splits, progress, base=True)
    base_evaluation = run.evaluation
    run.progress.test_before = _score(run, splits.test, progress)
    write_per_query(run.evaluation, out, base=True)  # the base on the final figures' split: failures.json's 'before'
    run.progress.retention_before = score_retention(run, splits.retention, _score, base=True)
    run.selection.start(run.progress.before)
    if out is not None and keep_best:  # the base is the best so far: a crash from here keeps a model
        save_artifact(run.clip, out, run.cfg)
        write_per_query(base_evaluation, out)
    return cpu_state(run.clip.model) if keep_best else None


def _train_epoch(run: RunState, dataset: PairDataset, loss_fn: Callable, splits: Splits, hooks: Hooks,
                 started: float) -> None:
    """One pass over the training data, from where a resumed run stopped."""
    cfg, p = run.cfg, run.progress
    run.train_model.train()
    batches = run.sampler.batches(p.epoch)
    per_epoch = len(batches)
    batches = batches[p.batches_done:]
    if run.ctx is not None:  # this rank's slice of each global batch
        per = cfg.train_batch_size // run.world_size
        batches = [b[run.ctx.rank * per : (run.ctx.rank + 1) * per] for b in batches]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skipping_bad,
                        num_workers=run.num_workers, pin_memory=run.clip.device.type == "cuda")
    bar = show_progress(loader, f"epoch {p.epoch}/{cfg.num_epochs}", total=per_epoch, unit="batch",
                        enabled=hooks.progress, initial=p.batches_done)
    for batch, bad in bar:
        for b in bad:  # each undecodable pair is met once per epoch: count it once
            if b.index not in p.bad_pairs:
                p.bad_pairs.append(b.index)
        loss = train_step(run, loss_fn, batch)
        p.batches_done += 1
        p.global_step += 1
        p.add_loss(loss)
        if loss is not None and math.isfinite(loss):
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
        if p.bad_in_a_row >= cfg.max_bad_steps:
            raise run.diverged(f"{p.bad_in_a_row} consecutive steps had a non-finite loss or gradients")
        if cfg.max_steps is not None and p.global_step >= cfg.max_steps:
            break  # the epoch is cut short here, then validated and checkpointed as a finished one
        if cfg.checkpoint_every_steps and p.global_step % cfg.checkpoint_every_steps == 0:
            p.epoch_seconds = time.perf_counter() - started
            run.sync_bad_pairs()
            _save_checkpoint(run, hooks)
    run.sync_bad_pairs()
    if p.epoch == 1 and per_epoch and len(set(p.bad_pairs)) >= per_epoch * cfg.train_batch_size:
        _nothing_decoded(splits, p.bad_pairs)


def _nothing_decoded(splits: Splits, bad_pairs: list[int]) -> None:
    """DataError: every training pair the first epoch met had an undecodable image (the first epoch meets
    each pair at most once, so `bad_pairs` is a subset of what it met): nothing was or will be learned."""
    examples = ", ".join(repr(splits.train[i].image) for i in sorted(bad_pairs)[:3])
    raise DataError(f"train: none of the {len(set(bad_pairs))} training images the first epoch read could be "
                    f"decoded (e.g. {examples}), so nothing can be learned; check that the files are images (JPEG, "
                    "PNG, ...) and not damaged or cut short, or raise max_image_pixels for very large ones")


def _validate(run: RunState, splits: Splits, progress: bool, base: bool = False) -> dict[str, float]:
    """The validation metrics (computed on rank 0, sent to all ranks so their bookkeeping agrees). `base`: the
    base model's, whose embeddings may be stored across runs (base_eval_cache)."""
    if not splits.validation:
        return {}
    scores: dict[str, float] | None = None
    if run.is_main:
        if not weights_are_finite(unwrap(run.clip.model)):
            raise run.diverged("the weights became non-finite")
        cache = run.eval_cache
        with cache.storing() if base and cache is not None else nullcontext():
            scores = _score(run, splits.validation, progress, cache)
    return broadcast(scores) if run.ctx is not None else scores


def _score(run: RunState, pairs: list | None, progress: bool = False, cache: EvalCache | None = None
           ) -> dict[str, float]:
    """Metrics of the model as it is now on `pairs` (rank 0 only; {} for none); `cache`: the validation
    pairs' EvalCache."""
    if not pairs or not run.is_main:
        return {}
    cfg = run.cfg
    kept: list[EvaluationResult] = []  # the per-query result the metrics come from, for per_query.json
    scores = evaluate(run.clip, pairs, cfg.batch_size, cfg.num_workers, progress=progress,
                      templates=cfg.label_templates, cache=cache, on_result=kept.append)
    run.evaluation = kept[0] if kept else None
    return scores


def _finish(run: RunState, splits: Splits, out: Path | None, best_state: dict[str, torch.Tensor] | None
            ) -> TrainResult:
    """Keep the best epoch's weights (not the last epoch's), mixed with the base's for WiSE-FT, and write
    them out with the result; count the undecodable training images in the train data report."""
    cfg, p, model = run.cfg, run.progress, run.clip.model
    if best_state is not None:
        unwrap(model).load_state_dict(best_state)
    result = result_of(run)
    if not result.improved and run.is_main:  # one rank says it, not each
        log.warning("%s", result.note)
    if p.skipped_steps and run.is_main:
        log.warning("%d steps had a non-finite loss or gradients and were skipped", p.skipped_steps)
    final = None  # a final evaluation that replaces the best epoch's in metrics.json, per query too
    if run.base_state is not None and run.is_main:
        if best_state is not None and out is not None:
            keep_unmixed_best(out)
        final = mix_with_base(run, splits, result, _score)  # the configured alpha, or auto WiSE-FT's
    check_retention(run, splits, result, _score)
    if run.is_main:
        _count_bad_images(splits, p.bad_pairs)
        if splits.test:  # the one look at the test split: the weights are final
            result.test = {"before": p.test_before, "after": _score(run, splits.test)}
            final = run.evaluation
            result.before, result.after, result.scored_on = result.test["before"], result.test["after"], "test"
    if out is not None and run.is_main:
        require_locked_folder(out)  # removed and made again by another run: its model is not ours to replace
        result.out_dir = save_artifact(run.clip, out, cfg, result.to_dict())
        write_per_query(final, out, gallery=True)  # and the failure gallery (failures.json)
        if cfg.export_onnx:
            from ..model.onnx_export import export_onnx

            export_onnx(run.clip, out / ONNX_DIR)
        # the run is complete: its resume state (weights + optimizer, ~3x the model) has no further use; the
        # unmixed best goes after it (a stop between the two must still resume from the unmixed weights)
        run.checkpoint.unlink(missing_ok=True)
        (out / UNMIXED_BEST_NAME).unlink(missing_ok=True)
    elif cfg.export_onnx and out is None:
        log.warning("export_onnx: no output folder to export to; call onnx_export.export_onnx(model, folder)")
    return result


def _save_checkpoint(run: RunState, hooks: Hooks) -> None:
    if run.checkpoint is not None and run.is_main:
        require_locked_folder(run.checkpoint.parent)  # not into another run's folder made at the same path
    save_checkpoint(run, hooks.on_checkpoint)


def _count_bad_images(splits: Splits, bad_pairs: list[int]) -> None:
    """The training pairs whose image could not be decoded, in the train split's report."""
    report = splits.report(TRAIN)
    for i in sorted(bad_pairs):
        pair = splits.train[i]
        report.skip("undecodable image", pair.item_id or pair.image)
        report.used -= 1
