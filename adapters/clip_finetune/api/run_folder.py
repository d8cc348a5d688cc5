"""Runs on disk, and the worker that trains one in the background.

A run is a folder under the runs folder (`$CLIP_FINETUNE_RUNS_DIR`, else `./runs`):

    request.json   what to train: validated hyperparameters and the train/eval data paths (written once)
    state.json     status (created/started/finished/failed), details, progress, error, the worker's pid
    run.log        the worker's log (its stdout and stderr)
    data/          in-memory pairs given to fit(), written out as JSONL tables (+ PNGs) the worker reads
    model/         the tuned model (open_clip local-dir artifact, with metrics.json)
    result.json    metrics before/after, best epoch, per-epoch history
    examples/      before.npz / after.npz: evaluation embeddings for example_results()

state.json is only ever replaced whole (temp file + fsync + os.replace), under a lock file so that the
worker and a reader marking a dead worker never lose each other's update. Readers take no lock.
The worker: `python -m adapters.clip_finetune.api.run_folder NAME --runs-dir DIR` (spawned by api.fit).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..data.pairs import CaptionPair
from ..errors import ClipFinetuneError, ConfigError, DataError

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # not "__main__" when run with -m

RUNS_DIR_ENV = "CLIP_FINETUNE_RUNS_DIR"
STATUSES = ("created", "started", "finished", "failed")
TERMINAL = ("finished", "failed")
REQUEST_NAME, STATE_NAME, LOG_NAME, RESULT_NAME = "request.json", "state.json", "run.log", "result.json"
MODEL_DIR, DATA_DIR, EXAMPLES_DIR = "model", "data", "examples"
WORKER_DIED = "worker died"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunError(ClipFinetuneError):
    """A run cannot be found or read, or what was asked of it needs a finished run."""


def runs_root(runs_dir: str | Path | None = None) -> Path:
    """The runs folder: `runs_dir`, else $CLIP_FINETUNE_RUNS_DIR, else ./runs (absolute)."""
    return Path(runs_dir or os.environ.get(RUNS_DIR_ENV) or "runs").expanduser().resolve()


def new_run_name() -> str:
    """A fresh, sortable name: run-20240131-235959-1a2b."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_run_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"run_name: {name!r} is not a usable folder name; use letters, digits, '.', '_' "
                          "and '-' (up to 100, starting with a letter or digit)")
    return name


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- atomic JSON files and the state lock -----------------------------------------------------------------


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, os.replace: readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are as readable as any other output
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    # the rename itself survives a power cut only once the folder is synced
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def _state_lock(run_dir: Path) -> Iterator[None]:
    with open(run_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / STATE_NAME)


def update_state(
    run_dir: Path, only_if: Callable[[dict[str, Any]], bool] | None = None, **changes: Any
) -> dict[str, Any]:
    """Merge `changes` into state.json (under the lock) unless `only_if(current state)` says no."""
    with _state_lock(run_dir):
        state = read_state(run_dir)
        if only_if is not None and not only_if(state):
            return state
        state.update(changes, updated_at=now())
        write_json_atomic(run_dir / STATE_NAME, state)
        return state


def create_run(root: Path, name: str, request: dict[str, Any]) -> Path:
    """Make the run folder with request.json and a 'created' state; the name must be new."""
    run_dir = root / check_run_name(name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise ConfigError(f"run_name: a run named {name!r} already exists in {str(root)!r}; pick another name "
                          f"or reconnect to it with get_run({name!r})") from None
    write_json_atomic(run_dir / REQUEST_NAME, request)
    write_json_atomic(run_dir / STATE_NAME, {
        "name": name, "status": "created", "details": "waiting for the worker to start", "progress": None,
        "error": None, "pid": None, "created_at": now(), "started_at": None, "finished_at": None,
    })
    (run_dir / LOG_NAME).touch()
    return run_dir


# --- is the worker alive? -----------------------------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process from /proc, or None when it has no entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[19])


def process_identity(pid: int) -> dict[str, Any]:
    """pid, its start time and the boot id: together they tell a live worker from a reused pid."""
    stat = _proc_stat(pid)
    return {"pid": pid, "pid_start": stat[1] if stat else None, "boot_id": _boot_id()}


def worker_alive(state: dict[str, Any]) -> bool:
    """False when the worker recorded in `state` is gone: exited, a zombie, killed by a machine restart,
    or its pid now belongs to another process. True when there is no pid yet."""
    pid = state.get("pid")
    if not pid:
        return True
    if state.get("boot_id") and _boot_id() and state["boot_id"] != _boot_id():
        return False
    if Path("/proc").is_dir():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return state.get("pid_start") is None or stat[1] == state["pid_start"]
    try:  # no /proc (macOS): signal 0 checks existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refresh_state(run_dir: Path) -> dict[str, Any]:
    """The run's state; a created/started run whose worker is gone is marked failed ("worker died")."""
    state = read_state(run_dir)
    if state["status"] in TERMINAL or worker_alive(state):
        return state
    return update_state(
        run_dir,
        # re-checked under the lock: the worker may have finished between our read and now
        only_if=lambda s: s["status"] not in TERMINAL and not worker_alive(s),
        status="failed", error=WORKER_DIED, finished_at=now(),
        details=f"{WORKER_DIED}: process {state['pid']} ended without reporting a result (killed, out of "
                f"memory, or the machine restarted) while {state['details']!r}; see {LOG_NAME}",
    )


# --- the worker -----------------------------------------------------------------------------------------------


def read_pairs(train_data: str, eval_data: str | None) -> tuple[list[CaptionPair], list[CaptionPair] | None]:
    """Training and evaluation pairs, as `clip-finetune train` reads them: without eval_data, the
    'validation' subset of train_data (if it has one) evaluates."""
    from ..data.dataloop import load_dataset

    subsets, _ = load_dataset(train_data)
    if "train" in subsets:
        train = subsets["train"]
    elif len(subsets) == 1:
        train = next(iter(subsets.values()))
    else:
        raise DataError(f"train_data {train_data!r}: no 'train' subset among {sorted(subsets)}; name the "
                        "training subset train/ or pass that subset's folder")
    val = subsets.get("validation")
    if eval_data:
        eval_sets, _ = load_dataset(eval_data)
        val = eval_sets.get("validation") or next(iter(eval_sets.values()))
    return train, val


def save_pair_embeddings(path: Path, emb: Any) -> None:
    """Write an evaluate.PairEmbeddings as .npz (numpy only, read back by api.Run.example_results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.asarray(emb.images, dtype=str), image_features=emb.image_features,
             captions=np.asarray(emb.captions, dtype=str), text_features=emb.text_features,
             text_to_image=emb.text_to_image)


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
    from ..config import build_config

    request = read_json(run_dir / REQUEST_NAME)
    cfg = build_config(request["config"])
    train, val = read_pairs(request["train_data"], request.get("eval_data"))
    log.info("run %s: %d training pairs, %d evaluation pairs", run_dir.name, len(train), len(val or []))

    # heavy imports only now: a bad data path fails in a second, without loading torch
    from ..data.images import set_max_image_pixels
    from ..model.clip import load_model
    from ..retrieval.evaluate import embed_pairs
    from ..training.loop import CHECKPOINT_NAME, check_sizes, fit, seed_everything

    check_sizes(cfg, len(train))
    update_state(run_dir, details="loading the model")
    set_max_image_pixels(cfg.max_image_pixels)  # fit() sets it too, but the base model embeds before fit()
    seed_everything(cfg.seed)  # fit() seeds, then builds the model: the same initial weights as the CLI's
    clip = load_model(cfg)
    if val:
        update_state(run_dir, details="embedding the evaluation set with the base model")
        save_pair_embeddings(run_dir / EXAMPLES_DIR / "before.npz", embed_pairs(clip, val, cfg.batch_size,
                                                                              cfg.num_workers))
    update_state(run_dir, details="training", progress={"epoch": 0, "num_epochs": cfg.num_epochs})

    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        score = record.get(cfg.early_stopping_metric)
        shown = f", {cfg.early_stopping_metric} {score:.4f}" if score is not None else ""
        update_state(run_dir, progress={"epoch": epoch, "num_epochs": cfg.num_epochs},
                     details=f"epoch {epoch}/{cfg.num_epochs} done: loss {record['train_loss']:.4f}{shown}")

    result = fit(cfg, train, val, out_dir=run_dir / MODEL_DIR, on_epoch_end=on_epoch_end, clip=clip,
                 progress=False).to_dict()
    if val:
        save_pair_embeddings(run_dir / EXAMPLES_DIR / "after.npz", embed_pairs(clip, val, cfg.batch_size,
                                                                             cfg.num_workers))
    write_json_atomic(run_dir / RESULT_NAME, result)
    # the resume checkpoint (weights + optimizer state, ~3x the model) is of no use once the run is done
    (run_dir / MODEL_DIR / CHECKPOINT_NAME).unlink(missing_ok=True)
    metric = result["metric"]
    summary = f"best epoch {result['best_epoch']}"
    if metric in result["before"]:
        summary += f": {metric} {result['before'][metric]:.4f} -> {result['after'][metric]:.4f}"
    # logged before the state says finished: a log reader that sees 'finished' has every line
    log.info("run %s finished, %s", run_dir.name, summary)
    update_state(run_dir, status="finished", details=summary, finished_at=now(),
                 progress={"epoch": len(result["history"]), "num_epochs": cfg.num_epochs})
    return result


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: train run NAME of the runs folder; stdout/stderr are the run's log file."""
    parser = argparse.ArgumentParser(prog="python -m adapters.clip_finetune.api.run_folder", description=main.__doc__)
    parser.add_argument("name")
    parser.add_argument("--runs-dir", help=f"runs folder (default: ${RUNS_DIR_ENV}, else ./runs)")
    args = parser.parse_args(argv)
    # this package at INFO (data report, epochs); other libraries' chatter (open_clip's INFO) only from WARNING
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger(__package__.rpartition(".")[0]).setLevel(logging.INFO)
    logging.captureWarnings(True)
    run_dir = runs_root(args.runs_dir) / check_run_name(args.name)
    try:
        execute(run_dir)
    except Exception:  # already logged and recorded in state.json by execute()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
