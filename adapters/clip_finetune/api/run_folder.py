"""Runs on disk: the run folder, its state file and whether its worker is alive.

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
The worker that trains a run is worker.py (spawned by api.fit).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ClipFinetuneError, ConfigError
from ..files import read_json, write_json

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


# --- the state lock -----------------------------------------------------------------


@contextlib.contextmanager
def _state_lock(run_dir: Path) -> Iterator[None]:
    with open(run_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state(run_dir: Path) -> dict[str, Any]:
    state = read_json(run_dir / STATE_NAME)
    if not isinstance(state, dict) or state.get("status") not in STATUSES or "created_at" not in state:
        raise RunError(f"{str(run_dir / STATE_NAME)!r} is not the state of a run (damaged or written by hand); "
                       "delete the run folder or restore the file")
    return state


def update_state(
    run_dir: Path, only_if: Callable[[dict[str, Any]], bool] | None = None, **changes: Any
) -> dict[str, Any]:
    """Merge `changes` into state.json (under the lock) unless `only_if(current state)` says no."""
    with _state_lock(run_dir):
        state = read_state(run_dir)
        if only_if is not None and not only_if(state):
            return state
        state.update(changes, updated_at=now())
        write_json(run_dir / STATE_NAME, state)
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
    write_json(run_dir / REQUEST_NAME, request)
    write_json(run_dir / STATE_NAME, {
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


def _started_within(ticks: int, state: dict[str, Any]) -> bool:
    """Whether a process started `ticks` clock ticks after boot can be the run's worker: it is started after the
    run folder is made (created_at) and before it says so (started_at). Without this, a pid recorded with no
    start time (an older writer, /proc unreadable at the time) stays alive forever once any process reuses it,
    pid 1 included, and `runs logs --follow` never ends. Unknown (no boot time, unparsable dates): alive."""
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        started = btime + ticks / os.sysconf("SC_CLK_TCK")
        created = datetime.fromisoformat(state["created_at"]).timestamp()
        reported = datetime.fromisoformat(state["started_at"]).timestamp() if state.get("started_at") else None
    except (OSError, StopIteration, ValueError, TypeError, KeyError, IndexError):
        return True
    slack = 5.0  # created_at has whole seconds; btime is rounded too
    return created - slack <= started and (reported is None or started <= reported + slack)


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
        if state.get("pid_start") is None:  # no start time recorded: judged by when that process started
            return _started_within(stat[1], state)
        return stat[1] == state["pid_start"]
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
                f"memory, or the machine restarted) while {state.get('details')!r}; see {LOG_NAME}",
    )
