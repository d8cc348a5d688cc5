"""The worker that trains one run of the runs folder in the background (spawned by api.fit):
`python -m adapters.clip_finetune.api.worker NAME --runs-dir DIR`.

It reads the run's request, trains with training.finetune (the same data choice and training as
`clip-finetune train`), records progress in state.json, and writes result.json and the example embeddings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ..errors import ClipFinetuneError
from ..machine import exit_process
from .run_folder import (
    EXAMPLES_DIR,
    LOG_FORMAT,
    MODEL_DIR,
    REQUEST_NAME,
    RESULT_NAME,
    RUNS_DIR_ENV,
    check_run_name,
    now,
    process_identity,
    read_json,
    runs_root,
    update_state,
    write_json,
)

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # not "__main__" when run with -m
PACKAGE = __package__.rpartition(".")[0]  # adapters.clip_finetune: its log goes to the run's log


def save_pair_embeddings(path: Path, emb: Any) -> None:
    """Write an evaluate.PairEmbeddings as .npz (numpy only, read back by api.Run.example_results)."""
    from ..retrieval.store import write_npz

    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, {"images": np.asarray(emb.images, dtype=str), "image_features": emb.image_features,
                     "captions": np.asarray(emb.captions, dtype=str), "text_features": emb.text_features,
                     "text_to_image": emb.text_to_image, "relevant": emb.relevant})


def execute(run_dir: Path) -> dict[str, Any]:
    """Train the run in this process, recording progress in state.json; returns the result dict.

    Any failure is recorded (status failed, error, details) and re-raised.
    """
    update_state(run_dir, status="started", started_at=now(), details="reading data",
                 **process_identity(os.getpid()))
    try:
        result = _train(run_dir)
    except BaseException as e:  # KeyboardInterrupt / SystemExit too: the state must not say 'started'
        error = str(e) if isinstance(e, ClipFinetuneError) else f"{type(e).__name__}: {e}"
        if isinstance(e, ClipFinetuneError):
            log.error("run failed: %s", error)
        else:
            log.exception("run failed")
        update_state(run_dir, status="failed", error=error, details=f"failed: {error}", finished_at=now())
        raise
    return result


def _train(run_dir: Path) -> dict[str, Any]:
    from ..app.train import training_of
    from ..config import build_config

    request = read_json(run_dir / REQUEST_NAME)
    cfg = build_config(request["config"])
    # the splits are read before torch loads (app.train imports it only to plan): a bad data path fails in a second
    training = training_of(cfg, request["train_data"], request.get("eval_data"), test=request.get("test_data"),
                           what="train_data", retention=request.get("retention_data"))
    splits, cfg = training.splits, training.cfg
    val = splits.validation
    log.info("run %s: %d training pairs, %d evaluation pairs, %d test pairs", run_dir.name, len(splits.train),
             len(val or []), len(splits.test or []))
    update_state(run_dir, details="loading the model")
    training.model()
    if val:
        update_state(run_dir, details="embedding the evaluation set with the base model")
        save_pair_embeddings(run_dir / EXAMPLES_DIR / "before.npz", training.embed_validation())
    update_state(run_dir, details="training", progress={"epoch": 0, "num_epochs": cfg.num_epochs})
    result = training.run(run_dir / MODEL_DIR, on_epoch_end=_epoch_reporter(run_dir, cfg), progress=False).to_dict()
    if val:
        save_pair_embeddings(run_dir / EXAMPLES_DIR / "after.npz", training.embed_validation())
    write_json(run_dir / RESULT_NAME, result)
    summary = _summary(result)
    # logged before the state says finished: a log reader that sees 'finished' has every line
    log.info("run %s finished, %s", run_dir.name, summary)
    update_state(run_dir, status="finished", details=summary, finished_at=now(), improved=result["best_epoch"] > 0,
                 progress={"epoch": len(result["history"]), "num_epochs": cfg.num_epochs})
    return result


def _epoch_reporter(run_dir: Path, cfg: Any) -> Any:
    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        score = record.get(cfg.early_stopping_metric)
        shown = f", {cfg.early_stopping_metric} {score:.4f}" if score is not None else ""
        update_state(run_dir, progress={"epoch": epoch, "num_epochs": cfg.num_epochs},
                     details=f"epoch {epoch}/{cfg.num_epochs} done: loss {record['train_loss']:.4f}{shown}")

    return on_epoch_end


def _summary(result: dict[str, Any]) -> str:
    metric = result["metric"]
    summary = f"best epoch {result['best_epoch']}"
    if metric in result["before"]:
        summary += f": {metric} {result['before'][metric]:.4f} -> {result['after'][metric]:.4f}"
    if result.get("note"):
        summary += f"; {result['note']}"
    return summary


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: train run NAME of the runs folder; stdout/stderr are the run's log file."""
    parser = argparse.ArgumentParser(prog="python -m adapters.clip_finetune.api.worker", description=main.__doc__)
    parser.add_argument("name")
    parser.add_argument("--runs-dir", help=f"runs folder (default: ${RUNS_DIR_ENV}, else ./runs)")
    args = parser.parse_args(argv)
    # this package at INFO (data report, epochs); other libraries' chatter (open_clip's INFO) only from WARNING
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger(PACKAGE).setLevel(logging.INFO)
    logging.captureWarnings(True)
    run_dir = runs_root(args.runs_dir) / check_run_name(args.name)
    try:
        execute(run_dir)
    except Exception:  # already logged and recorded in state.json by execute()
        return 1
    return 0


def run() -> NoReturn:
    """The worker process's entry (api.fit starts it): main(), then the process ends (machine.exit_process)."""
    exit_process(main())


if __name__ == "__main__":
    run()
