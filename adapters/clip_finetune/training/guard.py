"""A run folder knows what it is: whose checkpoint it holds (a fingerprint of the data and hyperparameters, so a
resume with other ones is refused naming the difference), who writes it (a lock refuses a second writer), and
whether it may be written at all (an existing model is not overwritten, nor the data folder, without being told).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig
from ..data.load import Splits
from ..data.pairs import CaptionPair
from ..errors import ClipFinetuneError, Setting
from ..files import read_json, require_writable
from ..model.clip import METRICS_NAME, is_artifact_dir
from .state import CHECKPOINT_NAME

log = logging.getLogger(__name__)

# Settings that change how a run goes but not what it learns: a resume may change them.
NOT_FINGERPRINTED = frozenset({"batch_size", "num_workers", "device", "image_cache_mb", "checkpoint_every_steps",
                               "max_bad_steps", "export_onnx", "grad_checkpointing", "num_processes",
                               "embeddings_size", "max_image_pixels",
                               "image_column", "caption_column"})  # which columns: the data digest covers the pairs


# (device, inode) of each folder this process holds the writer lock of, by absolute path
_LOCKED: dict[str, tuple[int, int]] = {}


class RunFolderError(ClipFinetuneError):
    """A run folder cannot be written as asked: it holds another run, another writer has it, or it is the data."""


def run_identity(cfg: FinetuneConfig, splits: Splits) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the hyperparameters that shape the training and a digest of
    each split's pairs (item id, caption, image file name and size: not the folder, which a re-download moves)."""
    hyper = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_FINGERPRINTED}
    return {"hyperparameters": hyper,
            "data": {"train": _digest(splits.train), "validation": _digest(splits.validation or [])}}


def _digest(pairs: Sequence[CaptionPair]) -> dict[str, Any]:
    h = hashlib.sha256()
    for p in pairs:
        try:
            size = os.stat(p.image).st_size
        except (OSError, ValueError):
            size = -1
        h.update(json.dumps([p.item_id, p.caption, Path(p.image).name, size]).encode("utf-8", "surrogatepass"))
    return {"pairs": len(pairs), "sha256": h.hexdigest()[:32]}


def identity_differences(theirs: dict[str, Any] | None, ours: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's run and this one, one phrase each ('learning_rate 0.001 there, 0.002
    now'); empty when they match."""
    if not isinstance(theirs, dict):
        return ["the checkpoint records no data or hyperparameters (an older version wrote it)"]
    diffs = []
    mine, other = ours["hyperparameters"], theirs.get("hyperparameters") or {}
    for key in sorted(set(mine) | set(other)):
        if mine.get(key) != other.get(key):
            diffs.append(f"{key} {json.dumps(other.get(key))} there, {json.dumps(mine.get(key))} now")
    for split, now in ours["data"].items():
        then = (theirs.get("data") or {}).get(split) or {}
        if then.get("sha256") != now["sha256"]:
            same = then.get("pairs") == now["pairs"]
            diffs.append(f"other {split} data ({then.get('pairs')} pairs there, {now['pairs']} now"
                         f"{': the same count, other items, captions or images' if same else ''})")
    return diffs


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder while this process writes it; a second writer is refused at once.

    The lock is flock on the folder itself (hand-written: a lock file would end up among the model's files, which
    the platform uploads); the system drops it when the process ends, also on SIGKILL, so no stale lock remains.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one writer is then the user's to ensure
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    key = os.path.abspath(folder)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderError(f"{str(folder)!r} is being written by another training right now; wait for it to "
                                 "end, or write this one to another folder") from None
        st = os.fstat(fd)
        _LOCKED[key] = (st.st_dev, st.st_ino)
        yield
    finally:
        _LOCKED.pop(key, None)
        os.close(fd)  # releases the lock


def require_locked_folder(folder: Path) -> None:
    """RunFolderError when `folder`, locked by this process (writer_lock), is no longer the folder it locked: the
    lock holds the folder's inode, so a folder removed and made again at the same path (another run's, perhaps
    finished) is not covered by it, and writing there would overwrite that run's files."""
    held = _LOCKED.get(os.path.abspath(folder))
    if held is None:
        return
    try:
        st = os.stat(folder)
        now = (st.st_dev, st.st_ino)
    except OSError:
        now = None
    if now != held:
        raise RunFolderError(f"{str(folder)!r} was removed or replaced while this training wrote it (another run may "
                             "own it now), so this run's model is not written there; train again into a folder "
                             "nothing else removes")


def check_output_folder(out: str | Path, data: Sequence[str | Path | None] = (), *, overwrite: bool = False,
                        resume: bool = False, flag: str = "out") -> Path:
    """Refuse an output folder that would mix with what it holds, before any work: a file; the data itself (or a
    folder holding it, or inside it); a place this user cannot write; a saved model or an unfinished run's
    checkpoint (unless `resume` continues it or `overwrite` replaces it); any other files (unless `overwrite`).
    `flag`: the argument that named the folder (errors name it, each face in its terms: cli/advice.py)."""
    out = Path(out).expanduser()
    advice = {"out": Setting(flag), "resume": Setting("resume"), "overwrite": Setting("overwrite")}
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{{out}} {str(out)!r} is a file; give a folder for the model (new or empty)",
                             advice=advice)
    real = Path(os.path.realpath(out))
    for source in filter(None, data):
        src = Path(os.path.realpath(Path(source).expanduser()))
        # a data folder may neither hold the model nor be inside it; a table's folder may hold models beside it
        mixed = (real == src or src.is_relative_to(real) or real.is_relative_to(src)) if src.is_dir() \
            else real == src.parent
        if mixed:
            raise RunFolderError(f"{{out}} {str(out)!r} would mix the model with the data {str(source)!r}; write "
                                 "the model to a folder outside the data", advice=advice)
    if not out.is_dir():
        require_writable(out, Setting(flag))  # a folder that cannot be made fails now, not after the data is read
        return out
    with writer_lock(out):  # a training writing it now: refused before any data is read (finetune locks again)
        pass
    if not any(out.iterdir()):
        return out
    held = _what_it_holds(out)
    if resume and (out / CHECKPOINT_NAME).is_file():
        return out
    if resume and is_artifact_dir(out) and not _finished(out):
        log.warning("%s %s holds the best model so far of a run stopped before its first checkpoint: nothing to "
                    "resume, starting from the beginning in it (resume)", flag, out)
        return out
    if overwrite:
        log.warning("%s %s holds %s: overwriting it (overwrite)", flag, out, held)
        return out
    fix = "{resume} continues it, {overwrite} starts over in it" if "checkpoint" in held else "{overwrite} replaces it"
    raise RunFolderError(f"{{out}} {str(out)!r} already holds {held}; {fix}, or choose a new folder", advice=advice)


def _finished(out: Path) -> bool:
    """Whether the model in `out` is a finished run's: its metrics.json holds the run's result (the best-so-far
    saves of a run in progress record only best_epoch and history). Unreadable: taken as finished (kept)."""
    path = out / METRICS_NAME
    if not path.exists():
        return False
    try:
        metrics = read_json(path)
    except ClipFinetuneError:
        return True
    return not isinstance(metrics, dict) or "metric" in metrics


def _what_it_holds(out: Path) -> str:
    if (out / CHECKPOINT_NAME).is_file():
        return "an unfinished run (its checkpoint)"
    if is_artifact_dir(out):
        return "a saved model"
    names = sorted(p.name for p in out.iterdir())
    return f"{len(names)} other files ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
