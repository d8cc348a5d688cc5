"""The reader of local tables: .csv (delimiter sniffed), .tsv or .jsonl with an image column and a caption
column; rows that cannot be used are skipped and counted in a DataReport."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from ..errors import DataError
from .pairs import CaptionPair, DataReport
from .safe_read import delimited_rows, image_problem, jsonl_rows

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
IMAGE_COLUMNS = ("filepath", "image", "image_path", "path", "file", "filename", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "description", "label")


def read_table(path: str | Path, report: DataReport | None = None) -> list[CaptionPair]:
    """Pairs of a .csv (delimiter sniffed), .tsv or .jsonl table with an image column and a caption column.

    Relative image paths resolve against the table's folder; rows with an empty caption or a missing
    image file are skipped and counted. A missing column is a DataError.
    """
    path = Path(path)
    report = report if report is not None else DataReport()
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"table {str(path)!r} has suffix {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    # rows bounded and read as consumed, encodings detected or named (safe_read.py)
    rows: Generator[Any, None, None] = (r for r in jsonl_rows(path, report)) if suffix == ".jsonl" else \
        delimited_rows(path, suffix == ".tsv", report)
    with contextlib.closing(rows):  # closing the generator closes the file
        columns = next(rows)
        image_col = _pick_column(columns, IMAGE_COLUMNS, "image", path)
        caption_col = _pick_column(columns, CAPTION_COLUMNS, "caption", path)
        id_col = next((c for c in columns if c.strip().lower() == "id"), None)
        pairs = []
        for n, row in rows:
            item_id = str(row.get(id_col) or "").strip() if id_col else ""
            pair = _table_pair(row, image_col, caption_col, path.parent, item_id or f"row {n}", report)
            if pair is not None:
                pairs.append(pair)
    report.used = len(pairs)
    return pairs


def _pick_column(columns: list[str], accepted: tuple[str, ...], what: str, path: Path) -> str:
    by_name = {c.strip().lower(): c for c in columns if c is not None}
    for name in accepted:
        if name in by_name:
            return by_name[name]
    raise DataError(
        f"table {str(path)!r} has no {what} column: found columns {columns}; name one of them "
        f"{' / '.join(accepted)} (case-insensitive), and make the first line a header"
    )


def _table_pair(
    row: dict[str, Any], image_col: str, caption_col: str, base: Path, item_id: str, report: DataReport
) -> CaptionPair | None:
    caption = _cell(row.get(caption_col))
    image = _cell(row.get(image_col))
    if caption is None or image is None:
        report.skip("caption or image path is not text", item_id)  # a JSON object or list in the cell
        return None
    if not caption:
        report.skip("no caption", item_id)
        return None
    if not image:
        report.skip("no image path", item_id)
        return None
    file = Path(image).expanduser()
    file = Path(os.path.normpath(file if file.is_absolute() else base / file))
    problem = image_problem(file)  # missing, a folder, a FIFO or device, a symlink loop, unreadable
    if problem is not None:
        report.skip(problem, item_id)
        return None
    return CaptionPair(str(file), caption, item_id)


def _cell(value: Any) -> str | None:
    if isinstance(value, dict | list):
        return None
    return "" if value is None else str(value).strip()
