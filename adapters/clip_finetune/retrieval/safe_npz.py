"""Reading an .npz a user hands us without trusting it: each array's header is checked against the bytes the
archive really holds before numpy allocates what the header claims (a 20-byte header may claim terabytes), arrays
of Python objects (pickles) are refused, and a truncated or foreign file is a DataError naming it.

Hand-written over numpy.lib.format's public header readers: np.load allocates the claimed array first and only
then finds the data missing.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from ..errors import DataError, Setting
from ..inputs import open_regular

MAX_COMPRESSION = 100  # an array deflated more than this is a compression bomb, not float vectors or file names


def load_npz(path: str | Path, required: Sequence[str], optional: Sequence[str] = (), hint: str = "",
             max_bytes: int | None = None, advice: Mapping[str, Setting] | None = None) -> dict:
    """{name: array} of the arrays of an .npz file; `required` ones must be there. DataError naming the file (and
    `hint`, what to do, naming `advice`'s settings as {key}: errors.ClipFinetuneError) for anything else: not a
    zip, truncated, a header that lies, an object array, or (given `max_bytes`) arrays that would take more than
    that many bytes once read."""
    try:
        return _load_npz(Path(path), required, optional, hint, max_bytes)
    except DataError as e:
        if not advice:
            raise
        raise DataError(str(e), advice=advice) from None


def _load_npz(path: Path, required: Sequence[str], optional: Sequence[str], hint: str, max_bytes: int | None
              ) -> dict:
    fix = f"; {hint}" if hint else ""
    with open_regular(path, "embeddings file") as f:
        try:
            with zipfile.ZipFile(f) as archive:
                members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
                missing = [name for name in required if name not in members]
                if missing:
                    raise DataError(f"{str(path)!r} has no {', '.join(repr(m) for m in missing)} array (it holds "
                                    f"{sorted(members)[:10]}); it is not an embeddings file of this tool{fix}")
                size = os.fstat(f.fileno()).st_size
                claimed = sum(members[name].file_size for name in (*required, *optional) if name in members)
                if max_bytes is not None and claimed > max_bytes:
                    raise DataError(f"{str(path)!r} would take {claimed} bytes once read, more than the {max_bytes} "
                                    f"its arrays can need{fix}")
                return {name: _read(archive, members[name], path, fix, size) for name in (*required, *optional)
                        if name in members}
        except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError) as e:
            raise DataError(f"{str(path)!r} is not a readable .npz file ({type(e).__name__}: {e}); it is truncated "
                            f"or not an embeddings file{fix}") from None


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, fix: str, file_size: int) -> np.ndarray:
    # the sizes in the zip directory are claims too: bounded by the file's real size (stored) or a sane ratio
    stored = info.compress_type == zipfile.ZIP_STORED
    if info.compress_size > file_size or (stored and info.file_size != info.compress_size) or (
            not stored and info.file_size > MAX_COMPRESSION * info.compress_size + (1 << 20)):
        raise DataError(f"{str(path)!r}: member {info.filename!r} claims {info.file_size} bytes the file cannot hold; "
                        f"it is truncated or forged{fix}")
    with archive.open(info) as member:
        version = npy_format.read_magic(member)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read_header(member)
        if dtype.hasobject:
            raise DataError(f"{str(path)!r}: array {info.filename!r} holds Python objects, which are pickles; it "
                            f"will not be loaded (unpickling can run code){fix}")
        claimed = math.prod(shape) * dtype.itemsize
        if claimed > info.file_size:
            raise DataError(f"{str(path)!r}: array {info.filename!r} claims {claimed} bytes of shape {shape}, the file "
                            f"holds {info.file_size}; it is truncated or forged{fix}")
    with archive.open(info) as member:
        return npy_format.read_array(member, allow_pickle=False)
