"""Files that are replaced whole: a reader sees the old file or the new one, never half of either.

Every output of this package that another process may read while it is written (weights, metrics, run
state, embeddings parts) goes through `atomic_write`.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(target: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temporary file in the target's folder, fsync it, rename it over `target`,
    then fsync the folder (the rename itself survives a power cut only once the folder is synced).

    The temporary file is created with the umask's permissions, as `open()` would create `target` (mkstemp's
    0600 would leave a shared output folder unreadable to others).
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(target.parent)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


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
