"""Reading what users hand us, bounded: a file is a regular file before it is opened (a FIFO would block, /dev/zero
never ends), JSON has a size and a nesting cap, text is UTF-8 or refused with the encoding it looks like, and a
caption is cut to a length well above any model's context before it is tokenized.

Every failure is an `Unreadable` (a DataError): `kind` is a short reason that data reports count items under,
`str()` a whole sentence naming the file and what to do. Callers that read one item among many skip and count it;
callers that read the one file a command was given let it stop the command.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import DataError, short_name

MAX_CONFIG_BYTES = 1 << 20  # a hyperparameter or model-config JSON: a few KB in practice
MAX_JSON_BYTES = 16 << 20  # a Dataloop item or prompt JSON: thousands of annotations stay far below; parsed, 16 MB
# of the smallest JSON values ([],[],...) still parse into about 0.4 GB of Python objects (measured)
MAX_JSON_DEPTH = 100  # nesting levels; Dataloop item JSONs use fewer than 10
MAX_LINE_CHARS = 1 << 20  # a JSONL line or a CSV field: captions are cut far below this anyway
# A caption is cut to 16 characters per token of the tokenizer's context before tokenizing (1,232 for CLIP's 77
# tokens; 8,192 for a 512-token Hugging Face tower), never below 1,024. An English token averages about 4
# characters, so the cut never reaches text the model would see; it bounds the tokenizer's time, which grows faster
# than a word's length in open_clip's BPE (a random 8,000-character word took 1.4 s here, 32,000: 11 s).
CAPTION_CHARS_PER_TOKEN = 16
MIN_CAPTION_CHARS = 1024
DEFAULT_CONTEXT = 77  # CLIP's
NEWLINE = b"\n"

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


class Unreadable(DataError):
    """A user file that cannot be read as asked. `kind`: a short reason (a data report key); str(): the file, the
    cause and the fix."""

    def __init__(self, path: str | os.PathLike, kind: str, detail: str = "", hint: str = "", what: str = "") -> None:
        self.path, self.kind = str(path), kind
        text = f"{what + ' ' if what else ''}{short_name(self.path)} {detail or kind}"
        super().__init__(f"{text}; {hint}" if hint else text)


def file_problem(path: str | os.PathLike) -> tuple[str, str] | None:
    """(kind, detail) of why `path` is not a readable regular file, or None when it is one. Never blocks and never
    raises: missing, a folder, a FIFO or device, a symlink loop, a name the system refuses, no permission."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", "does not exist"
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        return _os_problem(e)
    if stat.S_ISDIR(st.st_mode):
        return "a folder", "is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        return "not a regular file", f"is {what}, not a regular file"
    if not os.access(path, os.R_OK):
        return "unreadable", "cannot be read (permission denied)"
    return None


def _os_problem(e: OSError | ValueError) -> tuple[str, str]:
    if isinstance(e, ValueError):
        return "unusable name", f"is not a usable file name ({e})"
    if e.errno == errno.ELOOP:
        return "symlink loop", "is a symlink loop (a link that leads back to itself)"
    if e.errno == errno.ENAMETOOLONG:
        return "unusable name", "is a file name too long for the file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "unreadable", "cannot be read (permission denied)"
    if e.errno == errno.ENOTDIR:
        return "missing", "does not exist (a part of its path is a file, not a folder)"
    return "unreadable", f"cannot be read ({e.strerror or e})"


def require_file(path: str | os.PathLike, what: str = "") -> Path:
    """`path` when it is a readable regular file; else Unreadable naming it (and `what` it was given as)."""
    problem = file_problem(path)
    if problem is not None:
        kind, detail = problem
        raise Unreadable(path, kind, detail,
                         "check the path" if kind in ("missing", "unusable name") else "give a regular file", what)
    return Path(path)


def open_regular(path: str | os.PathLike, what: str = "") -> BinaryIO:
    """A regular file opened for reading, in binary; Unreadable for anything else.

    Opened non-blocking and checked again on the open handle: a file swapped for a FIFO after the first check
    still never blocks."""
    require_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise Unreadable(path, *_os_problem(e), what=what) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Unreadable(path, "not a regular file", "is not a regular file", "give a regular file", what)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str = "") -> bytes:
    """The whole content of a regular file of at most `max_bytes` bytes (Unreadable otherwise); nothing past the
    cap is read."""
    with open_regular(path, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Unreadable(path, "too large", f"is larger than {_size(max_bytes)}",
                         "this is not the file that was meant, or split it", what)
    return data


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n} bytes"


def decode_utf8(data: bytes, path: str | os.PathLike) -> str:
    """Text of a file's bytes: UTF-8 (a byte-order mark is dropped) or UTF-16/32 with a byte-order mark;
    anything else is Unreadable naming the encoding it looks like."""
    encoding = bom_encoding(data)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise not_utf8(path, data, e.start) from None


def bom_encoding(head: bytes) -> str:
    """The codec a file's first bytes announce: utf-32 / utf-16 by their byte-order mark, else utf-8-sig."""
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    return "utf-8-sig"


def not_utf8(path: str | os.PathLike, data: bytes, position: int, where: str | None = None) -> Unreadable:
    """The error for text that is not UTF-8: where it fails (`where`, else the line of `position` in `data`), what
    it looks like, how to convert it."""
    where = where or f"line {data.count(NEWLINE, 0, position) + 1}"
    if looks_utf16(data[:4096]):
        looks = "UTF-16 or UTF-32 without a byte-order mark"
        fix = "save it as UTF-8 (or as UTF-16 with a byte-order mark)"
    else:
        guess = guess_encoding(data)
        looks = f"{guess} (a guess: Windows and ISO code pages are easily mistaken for one another)" if guess \
            else "a legacy single-byte encoding"
        fix = f"save it as UTF-8, e.g. iconv -f {guess or 'cp1252'} -t utf-8 IN > OUT"
    bad = data[position:position + 1].hex()
    return Unreadable(path, "not UTF-8", f"is not UTF-8 text (byte 0x{bad} in {where}; it looks like {looks})",
                      fix)


# The legacy encodings text files come in, for the guess: charset-normalizer picks exotic ones (cp1006, an Urdu
# code page) for a short accented sample when left to all it knows.
COMMON_ENCODINGS = ["cp1252", "cp1250", "cp1251", "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "latin_1",
                    "iso8859_2", "iso8859_5", "iso8859_7", "iso8859_15", "koi8_r", "mac_roman", "cp437", "cp850",
                    "shift_jis", "cp932", "euc_jp", "gb18030", "big5", "euc_kr", "cp949", "tis_620"]


def looks_utf16(head: bytes) -> bool:
    """True when a file's first bytes are UTF-16/32 text without a byte-order mark: NUL bytes make up a good part of
    them (every other byte of ASCII in UTF-16), where a stray NUL in UTF-8 text is one among thousands."""
    return head.count(0) > len(head) // 8


def guess_encoding(data: bytes) -> str | None:
    """charset-normalizer's guess at the encoding of `data` (its first 64 KB), for error messages only."""
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return None
    best = from_bytes(data[: 64 << 10], cp_isolation=COMMON_ENCODINGS).best()
    return best.encoding if best is not None else None


def parse_json(data: bytes | str, path: str | os.PathLike, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON of a file's content, nested at most `max_depth` levels; Unreadable naming the file otherwise."""
    text = decode_utf8(data, path) if isinstance(data, bytes) else data
    try:
        value = json.loads(text)
    except RecursionError:  # the C parser recurses once per level: far past max_depth, never a crash
        raise _too_deep(path, max_depth) from None
    except ValueError as e:  # JSONDecodeError, and an integer of more than 4,300 digits
        raise Unreadable(path, "not JSON", f"is not valid JSON ({e})", "fix or replace the file") from None
    if json_depth(value) > max_depth:
        raise _too_deep(path, max_depth)
    return value


def _too_deep(path: str | os.PathLike, max_depth: int) -> Unreadable:
    return Unreadable(path, "nested too deeply", f"is JSON nested deeper than {max_depth} levels",
                      "this is not the file that was meant")


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any] = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
        deepest = max(deepest, depth + (1 if isinstance(node, dict | list) else 0))
    return deepest


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, what: str = "") -> Any:
    """A JSON file, bounded in size and depth (Unreadable otherwise)."""
    return parse_json(read_bytes(path, max_bytes, what), path)


def caption_chars(context_length: int | None) -> int:
    """The length in characters a caption is cut to before a tokenizer of `context_length` tokens sees it."""
    return max(MIN_CAPTION_CHARS, CAPTION_CHARS_PER_TOKEN * int(context_length or DEFAULT_CONTEXT))


def cap_captions(texts: Iterable[str], context_length: int | None) -> list[str]:
    """`texts` as a tokenizer of `context_length` tokens may take them: cut to caption_chars(context_length)
    characters (runs of whitespace made single spaces first, as the tokenizers do), and lone surrogates (a JSON
    "\\udc80" escape), which no tokenizer can encode, replaced by '?'. Other texts are returned as they are."""
    limit = caption_chars(context_length)
    return [_tokenizable(t, limit) for t in texts]


def _tokenizable(text: str, limit: int) -> str:
    if len(text) > limit:
        text = " ".join(text[: 8 * limit].split())[:limit]
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text
