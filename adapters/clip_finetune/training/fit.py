"""THE entry to training: `finetune`, and `plan_run`, what a run fixes before any work (the sizes checked
against the data, the process count, the process-wide settings applied), done once per run: app.train plans
before it loads the model, then hands the plan to `finetune`.

It runs the loop in this process, as a rank under torchrun, or starts the other ranks itself (launch.py)
when the configuration asks for several processes; and it writes what the data readers reported (and the
images training could not decode) to data_report.json beside the saved model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import FinetuneConfig
from ..data.load import Splits
from ..files import write_json
from ..machine import apply_config
from ..model.card import write_model_card
from ..model.clip import ClipModel, is_artifact_dir, load_model
from .distributed import DistContext
from .guard import require_locked_folder, writer_lock
from .launch import launch, resolve_num_processes
from .loop import EpochCallback, Hooks, train_rank
from .optim import check_sizes
from .state import CheckpointCallback, TrainResult
from .tracking import Tracker, open_tracker, require_tracker

log = logging.getLogger(__name__)

DATA_REPORT_NAME = "data_report.json"


@dataclass(frozen=True)
class RunPlan:
    """A configuration fitted to its run: `cfg` with the train_batch_size the data allows, the number of
    processes, and this process's place among them (None: not under torchrun)."""

    cfg: FinetuneConfig
    nprocs: int
    ctx: DistContext | None


def plan_run(cfg: FinetuneConfig, n_train: int, applied: bool = False) -> RunPlan:
    """Check the sizes against `n_train` training pairs (a batch larger than the data is lowered to it) and apply
    the configuration's process-wide settings (pixel limit, seeds, threads): once per run, before any work.
    `applied`: the caller applied `cfg`'s settings already (the Dataloop adapter does when it loads a model)."""
    ctx = DistContext.from_env()
    if ctx is not None:
        nprocs = ctx.world_size
    else:  # a launcher's single process (torchrun --nproc_per_node 1) sets RANK: it asked for one process
        nprocs = 1 if "RANK" in os.environ else resolve_num_processes(cfg.num_processes, cfg.device)
    size = check_sizes(cfg.optimisation, n_train, nprocs)
    if size != cfg.train_batch_size:
        cfg = cfg.model_copy(update={"train_batch_size": size})
    plan = RunPlan(cfg, nprocs, ctx)
    if not applied:  # sizes change no process setting: applying `cfg` before them is the same
        apply_config(plan.cfg.data)
    return plan


def finetune(
    cfg: FinetuneConfig | RunPlan,
    splits: Splits,
    out_dir: str | Path | None = None,
    *,
    on_epoch_end: EpochCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    clip: ClipModel | None = None,
    progress: bool = True,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune a CLIP model on `splits.train`; pick the best epoch on `splits.validation`; score the final
    weights on `splits.test` once (the result's 'after', when there is one).

    The best epoch's weights (by `cfg.early_stopping_metric` on validation) end up in `clip.model` and,
    when `out_dir` is given, in an open_clip local-dir artifact there with finetune_config.json, metrics.json
    and data_report.json; the artifact is rewritten at each new best, so a crash keeps the best so far.
    Without validation pairs (load_splits holds some out of the training data when it can) the last epoch
    counts as the best and nothing stops early. A train_batch_size larger than the data is lowered to it. With
    `cfg.wise_ft_alpha` below 1 the saved weights are that mix of the best epoch's and the starting weights.

    With `out_dir`, out_dir/checkpoint.pt holds the whole training state, written atomically at every epoch end
    and every `cfg.checkpoint_every_steps` steps (`on_checkpoint(path)` is called after each write);
    `resume=True` continues from it exactly (on CPU the weights equal an uninterrupted run's). A run that
    completes deletes its checkpoint. Images that cannot be decoded are skipped and counted in
    `splits.reports['train']`.

    Distributed: under torchrun every rank calls finetune(); rank 0 evaluates, writes and calls the callbacks,
    and its result is the run's. Outside torchrun, `cfg.num_processes` > 1 (or null with several GPUs) makes
    this call start the other ranks and train as rank 0.

    `cfg` may be a RunPlan (plan_run's): its sizes are then not checked nor its settings applied again.
    """
    plan = cfg if isinstance(cfg, RunPlan) else plan_run(cfg, len(splits.train))
    if plan.cfg.export_onnx:  # missing packages fail now, not after the training
        from ..model.onnx_export import require_exporter

        require_exporter()
    require_tracker(plan.cfg.tracking)  # a missing tracking package fails now, not after the training
    writes = out_dir is not None and (plan.ctx is None or plan.ctx.is_main)
    if writes:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    # one writer per output folder: a second training into it is refused while this one runs (guard.py)
    with writer_lock(Path(out_dir)) if writes else contextlib.nullcontext():
        tracker = _tracker(plan.cfg, out_dir) if plan.ctx is None or plan.ctx.is_main else None
        hooks = Hooks(_tracked(on_epoch_end, tracker), on_checkpoint, progress)
        try:
            result = _run(plan, splits, out_dir, clip, hooks, resume)
        except BaseException:
            if tracker is not None:
                tracker.finish(ok=False)
            raise
        if writes:
            _write_data_report(Path(out_dir), splits)
        if tracker is not None:
            tracker.close(result.to_dict(), Path(out_dir) if writes else None)
    return result


def _write_data_report(out: Path, splits: Splits) -> None:
    require_locked_folder(out)
    write_json(out / DATA_REPORT_NAME, splits.report_dict())
    if is_artifact_dir(out):  # the card's data section counts what this report says
        write_model_card(out)


def _tracker(cfg: FinetuneConfig, out_dir: str | Path | None) -> Tracker | None:
    """The experiment tracker of `cfg.tracking`, named after the output folder (a run's name)."""
    folder = Path(out_dir).resolve() if out_dir is not None else None
    name = "clip-finetune" if folder is None else folder.parent.name if folder.name == "model" else folder.name
    return open_tracker(cfg.tracking, name, cfg.model_dump(mode="json"), folder)


def _tracked(on_epoch_end: EpochCallback | None, tracker: Tracker | None) -> EpochCallback | None:
    if tracker is None:
        return on_epoch_end

    def both(epoch: int, record: dict[str, float]) -> None:
        tracker.log_epoch(epoch, record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    return both


def _run(plan: RunPlan, splits: Splits, out_dir: str | Path | None, clip: ClipModel | None, hooks: Hooks,
         resume: bool) -> TrainResult:
    """Train as a torchrun rank, as the one process, or as rank 0 of ranks started here."""
    if plan.ctx is None and plan.nprocs > 1:
        clip = clip or load_model(plan.cfg.model, "cpu", plan.cfg.seed)
        return launch(plan.nprocs, plan.cfg, splits, clip, out_dir, hooks, resume)
    return train_rank(plan.cfg, splits, out_dir, clip, hooks, resume, plan.ctx)
