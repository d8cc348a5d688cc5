"""The reader of local tables: .csv (delimiter sniffed), .tsv or .jsonl with an image column and a caption
column, a label column, or both; rows that cannot be used are skipped and counted in a DataReport."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import DataError
from .labels import DEFAULT_TEMPLATE, label_leaf, label_pairs
from .pairs import CaptionPair, DataReport, row_id
from .safe_read import delimited_rows, image_problem, jsonl_rows

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
IMAGE_COLUMNS = ("filepath", "image", "image_path", "path", "file", "filename", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "description")
LABEL_COLUMNS = ("label", "class", "category")


def read_table(path: str | Path, report: DataReport | None = None, label_template: str = DEFAULT_TEMPLATE,
               column_names: tuple[str | None, str | None] = (None, None)) -> list[CaptionPair]:
    """Pairs of a .csv (delimiter sniffed), .tsv or .jsonl table with an image column and a caption column,
    a label column, or both (a row without a caption is captioned by `label_template` and its label).
    `column_names`: the (image, caption) column names the user chose (config image_column / caption_column); None
    for either: the first of the usual names.

    Relative image paths resolve against the table's folder; rows with neither caption nor label, or with a
    missing image file, are skipped and counted. A missing column is a DataError.
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
        cols = _columns(columns, path, *column_names)
        id_col = next((c for c in columns if c.strip().lower() == "id"), None)
        pairs: list[CaptionPair] = []
        for n, row in rows:
            item_id = str(row.get(id_col) or "").strip() if id_col else ""
            # an id column numbers the rows of its own file (train.csv and val.csv may each count 1..N): scoped
            pairs += [replace(p, id_scope=str(path)) for p in
                      _table_pairs(row, cols, path.parent, item_id or row_id(n), report, label_template)]
    report.used = len(pairs)
    return pairs


def _columns(columns: list[str], path: Path, image: str | None = None, caption: str | None = None
             ) -> tuple[str, str | None, str | None]:
    """(image, caption, label) columns; a caption or a label column is needed, an image column always. A
    column the user named (`image`, `caption`) must be there; it is then the only one considered."""
    image_col = _named_column(columns, image, "image", path) or _pick_column(columns, IMAGE_COLUMNS, "image", path)
    if caption is not None:
        return image_col, _named_column(columns, caption, "caption", path), None
    label_col = _find_column(columns, LABEL_COLUMNS)
    caption_col = _find_column(columns, CAPTION_COLUMNS) or (
        None if label_col else _pick_column(columns, CAPTION_COLUMNS + LABEL_COLUMNS, "caption", path))
    return image_col, caption_col, label_col


def _named_column(columns: list[str], name: str | None, what: str, path: Path) -> str | None:
    if name is None:
        return None
    found = _find_column(columns, (name.strip().lower(),))
    if found is None:
        raise DataError(f"table {str(path)!r} has no column {name!r} (the {what} column you named: --{what}-column "
                        f"or {what}_column); its columns: {columns}")
    return found


def _find_column(columns: list[str], accepted: tuple[str, ...]) -> str | None:
    by_name = {c.strip().lower(): c for c in columns if c is not None}
    return next((by_name[name] for name in accepted if name in by_name), None)


def _pick_column(columns: list[str], accepted: tuple[str, ...], what: str, path: Path) -> str:
    found = _find_column(columns, accepted)
    if found is not None:
        return found
    raise DataError(
        f"table {str(path)!r} has no {what} column: found columns {columns}; name one of them "
        f"{' / '.join(accepted)} (case-insensitive), and make the first line a header"
    )


def _table_pairs(row: dict[str, Any], cols: tuple[str, str | None, str | None], base: Path, item_id: str,
                 report: DataReport, label_template: str) -> list[CaptionPair]:
    """The pair of one row: its caption (and label, if any), else a caption made from its label."""
    image_col, caption_col, label_col = cols
    caption = _cell(row.get(caption_col)) if caption_col else ""
    label = _cell(row.get(label_col)) if label_col else ""
    image = _cell(row.get(image_col))
    if caption is None or image is None or label is None:
        report.skip("caption or image path is not text", item_id)  # a JSON object or list in the cell
        return []
    label = label_leaf(label) if label else ""
    if not caption and not label:
        report.skip("no caption" if not label_col else "no caption or label", item_id)
        return []
    if not image:
        report.skip("no image path", item_id)
        return []
    file = Path(image).expanduser()
    file = Path(os.path.normpath(file if file.is_absolute() else base / file))
    problem = image_problem(file)  # missing, a folder, a FIFO or device, a symlink loop, unreadable
    if problem is not None:
        report.skip(problem, item_id)
        return []
    if caption:
        return [CaptionPair(str(file), caption, item_id, label)]
    return label_pairs(str(file), [label], item_id, label_template)


def _cell(value: Any) -> str | None:
    if isinstance(value, dict | list):
        return None
    return "" if value is None else str(value).strip()
