"""Bounded reading of the files a dataset is made of (inputs.py holds the file-level bounds): the rows of a
CSV/TSV/JSONL table or the lines of a text file, streamed, each at most MAX_LINE_CHARS characters, and why an image
file of a dataset cannot be used. A row that cannot be read is skipped and counted; only a file that is not text
at all stops the read.

Encodings: UTF-8 (with or without a byte-order mark) and UTF-16/32 with one. A row holding bytes that are not
UTF-8 is skipped ("not UTF-8 text") when the file has shown real UTF-8 text before it (a few damaged rows); when
it has not, the file is in another encoding and the read stops with an error naming the encoding it looks like
(skipping would silently drop every accented caption of a Latin-1 file).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, TextIO

from ..inputs import (
    MAX_LINE_CHARS,
    Unreadable,
    bom_encoding,
    file_problem,
    looks_utf16,
    not_utf8,
    open_regular,
    parse_json,
)
from .pairs import DataReport

logger = logging.getLogger(__name__)

_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape decodes a byte that is not UTF-8 to


class _Encoding:
    """Follows a file's text row by row and says which rows hold undecodable bytes (see the module docstring)."""

    def __init__(self, path: Path, codec: str) -> None:
        self.path, self.codec = path, codec
        self.seen_utf8 = codec != "utf-8-sig"  # UTF-16/32 announced by a byte-order mark: nothing to guess

    def usable(self, text: str, where: str) -> bool:
        """True for good text; False for a damaged row to skip; raises for a file in another encoding."""
        if text.isascii():
            return True
        if _SURROGATE.search(text) is None:
            self.seen_utf8 = True
            return True
        if self.seen_utf8:
            return False
        raw = text.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
            position = 0
        except UnicodeDecodeError as e:
            position = e.start
        raise not_utf8(self.path, raw, position, where)


def _open_text(path: Path, what: str) -> tuple[TextIO, _Encoding]:
    """The file as text: a regular file (a FIFO would block), the codec of its byte-order mark, bytes that are not
    UTF-8 kept as surrogates for _Encoding to judge."""
    raw = open_regular(path, what)
    try:
        head = raw.read(64 << 10)
        raw.seek(0)
        codec = bom_encoding(head)
        if codec == "utf-8-sig" and looks_utf16(head):
            raise not_utf8(path, head, head.index(0))  # UTF-16 without a byte-order mark: the error names it
    except BaseException:
        raw.close()
        raise
    return io.TextIOWrapper(raw, encoding=codec, errors="surrogateescape", newline=""), _Encoding(path, codec)


def delimited_rows(path: Path, tab: bool, report: DataReport) -> Generator[Any, None, None]:
    """The header (first), then the rows of a .csv (delimiter sniffed) or .tsv file, read as they are consumed;
    closing the generator closes the file."""
    f, encoding = _open_text(path, "table")
    with f:
        sample = f.read(8192)
        f.seek(0)
        if tab:
            dialect: Any = csv.excel_tab
        else:
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
            except csv.Error:  # a single column, or too little text to tell: the default is a comma
                dialect = csv.excel
        reader = csv.reader(f, dialect=dialect)  # newline="": quoted newlines stay inside their field
        header = _next_row(reader)
        if isinstance(header, csv.Error):
            raise Unreadable(path, "bad header", f"has an unreadable header line ({header})", "fix its first line")
        header = header or []
        encoding.usable("".join(header), "the header line")
        yield header
        n = 0
        while (row := _next_row(reader)) is not None:
            n += 1
            if isinstance(row, csv.Error):
                report.skip("unreadable row", f"row {n}")
            elif not encoding.usable("".join(row), f"row {n}"):
                report.skip("not UTF-8 text", f"row {n}")
            elif row:
                yield n, dict(zip(header, row, strict=False))


def _next_row(reader: Any) -> list[str] | csv.Error | None:
    old = csv.field_size_limit(MAX_LINE_CHARS)  # a caption over csv's default 131,072 characters is still read
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:  # a field over MAX_LINE_CHARS: the reader goes on at the next line
        return e
    finally:
        csv.field_size_limit(old)


def jsonl_rows(path: Path, report: DataReport) -> list[Any]:
    """The keys seen (first), then the rows of a .jsonl file: one JSON object a line, each line at most
    MAX_LINE_CHARS characters. All are read first: the columns are those of every row."""
    f, encoding = _open_text(path, "table")
    rows, columns = [], {}
    with f:
        for n, line in _lines(f):
            if line is None or not encoding.usable(line, f"line {n}"):
                report.skip("line too long" if line is None else "not UTF-8 text", f"line {n}")
                continue
            if not line.strip():
                continue
            try:
                obj = parse_json(line, path)
            except Unreadable as e:
                report.skip("unreadable json line" + ("" if e.kind == "not JSON" else f" ({e.kind})"), f"line {n}")
                continue
            if not isinstance(obj, dict):
                report.skip("unreadable json line", f"line {n}")
                continue
            rows.append((n, obj))
            columns.update(dict.fromkeys(obj))
    return [list(columns), *rows]


def text_lines(path: Path) -> list[str]:
    """The non-empty, stripped lines of a text file (`embed --texts`); a line over MAX_LINE_CHARS or not UTF-8
    is skipped, counted and logged."""
    report = DataReport()
    f, encoding = _open_text(path, "texts file")
    out = []
    with f:
        for n, line in _lines(f):
            if line is None or not encoding.usable(line, f"line {n}"):
                report.skip("line too long" if line is None else "not UTF-8 text", f"line {n}")
            elif line.strip():
                out.append(line.strip())
    if report.skipped:
        logger.warning("%s: %d lines skipped: %s", path, report.total_skipped, report.summary())
    return out


def _lines(f: TextIO) -> Iterator[tuple[int, str | None]]:
    """(number, line) of a text file, read at most MAX_LINE_CHARS + 1 characters at a time; None stands for a longer
    line, whose rest is read and dropped without being kept."""
    n = 0
    while line := f.readline(MAX_LINE_CHARS + 1):
        n += 1
        if len(line) > MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            while (rest := f.readline(MAX_LINE_CHARS)) and not rest.endswith(("\n", "\r")):
                pass
            yield n, None
        else:
            yield n, line


def image_problem(file: str | os.PathLike, root: str | None = None) -> str | None:
    """Why a dataset's image file cannot be used, as a data report reason ('image file missing', 'image file is a
    symlink loop', 'image file is not a regular file', ...), or None. With `root` (a real path: no symlink in it),
    a file whose symlinks lead out of that folder is refused too."""
    problem = file_problem(file)
    if problem is not None:
        kind = problem[0]  # "a folder", "not a regular file", "unreadable", "symlink loop", ...
        if kind in ("missing", "unusable name"):
            return "image file missing"
        return f"image file is {'a symlink loop' if kind == 'symlink loop' else kind}"
    if root is not None and links_out(file, root):
        return "image file links out of the download"
    return None


def links_out(file: str | os.PathLike, root: str) -> bool:
    """True when `file`, its symlinks followed, lies outside the folder `root` (a real path)."""
    return not os.path.realpath(file).startswith(root.rstrip(os.sep) + os.sep)
