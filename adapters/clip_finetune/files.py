"""Files that are replaced whole: a reader sees the old file or the new one, never half of either.

Every output of this package that another process may read while it is written (weights, metrics, run
state, embeddings parts) goes through `atomic_write`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ClipFinetuneError
from .inputs import MAX_JSON_BYTES
from .inputs import read_json as read_bounded_json


def atomic_write(target: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temporary file in the target's folder, fsync it, rename it over `target`,
    then fsync the folder (the rename itself survives a power cut only once the folder is synced).

    The file gets the umask's permissions, as `open()` would create `target`, whatever `write` does: mkstemp's
    0600 would leave a shared output folder unreadable to others, and safetensors' save_file replaces the file
    it is given by a 0600 one.
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask, read without changing the process's umask
    try:
        try:
            write(tmp)
        except (OSError, ClipFinetuneError):
            raise
        except Exception as e:  # torch and safetensors report a full disk as RuntimeError / SafetensorError
            refused = disk_refusal(e, tmp)
            if refused is None:
                raise
            raise OSError(refused, os.strerror(refused), str(target)) from e
        with open(tmp, "rb+") as f:
            if stat.S_IMODE(os.fstat(f.fileno()).st_mode) != mode:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(target.parent)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error (safetensors) shows the errno
_WRITE_FAILED = ("file write failed", "unexpected pos")  # torch's PytorchStreamWriter when a write falls short


def disk_refusal(error: BaseException, partial: Path) -> int | None:
    """The errno behind a writer's non-OSError failure when the disk refused the bytes (full, over the file-size
    limit, read-only, quota), else None. Read from the message where the library keeps it (safetensors), else
    asked of the disk: one more byte appended to the partial file fails the same way when the disk is the cause
    (a full disk or RLIMIT_FSIZE fails the next write too)."""
    found = _OS_ERROR.search(str(error))
    if found is not None and int(found.group(1)) in DISK_ERRNOS:
        return int(found.group(1))
    if not any(text in str(error) for text in _WRITE_FAILED):
        return None
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_APPEND)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, b"\0")
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)
    return errno.EIO  # torch could not write it whole, though the disk takes a byte now: an I/O error all the same


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def require_writable(path: str | Path, what: Any) -> None:
    """DataError naming `what` (words, or the errors.Setting that named the folder) unless the folder `path` (or,
    while it does not exist, the nearest one above it that does) can be written by this user: checked before the
    work whose output would go there."""
    from .errors import DataError, Setting

    advice = {"what": what} if isinstance(what, Setting) else None
    name = "{what}" if advice else what
    folder = Path(path).expanduser().absolute()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise DataError(f"{name} {str(path)!r}: {str(existing)!r} is a file, not a folder; choose another place",
                        advice=advice)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{name} {str(path)!r}: this user cannot write in {str(existing)!r}; choose another place",
                        advice=advice)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    """A JSON file of this package (run state, request, result), read bounded: a damaged or planted one is a
    DataError naming it, not a traceback."""
    return read_bounded_json(path, MAX_JSON_BYTES)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is all we can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
