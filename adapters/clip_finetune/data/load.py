"""THE choice of training and validation data, for every entry point (CLI, Python API, Dataloop adapter).

A data path is a table (.csv/.tsv/.jsonl), one Dataloop subset download (a folder with items/ and json/), or
a folder of such subsets (train/, validation/, ...). `load_splits` reads it (and an optional separate
validation path) into `Splits`: the training pairs, the validation pairs and, per split, a DataReport of
what was used and skipped. Training writes those reports to data_report.json beside the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..inputs import file_problem
from .dataloop import ImageResolver, read_subset
from .pairs import CaptionPair, DataReport
from .tables import TABLE_SUFFIXES, read_table

logger = logging.getLogger(__name__)

TRAIN, VALIDATION, TEST = "train", "validation", "test"
# The folder names a folder of subsets may use for each split (case-insensitive); other names are kept as they are.
SPLIT_NAMES = {TRAIN: ("train", "training"), VALIDATION: ("validation", "val", "valid", "dev"),
               TEST: ("test", "testing")}
NO_PAIRS_HINT = "or point to other data"


@dataclass
class Splits:
    """The pairs a run trains on and selects its best epoch with, and what reading each split used and
    skipped (training adds the images it could not decode to the train report)."""

    train: list[CaptionPair]
    validation: list[CaptionPair] | None = None
    reports: dict[str, DataReport] = field(default_factory=dict)

    def report(self, name: str) -> DataReport:
        """The report of split `name`, created empty for in-memory pairs."""
        return self.reports.setdefault(name, DataReport(used=len(getattr(self, name) or [])))

    def report_dict(self) -> dict[str, Any]:
        """What data_report.json holds: {split: {used, skipped, examples}}."""
        return {name: r.to_dict() for name, r in self.reports.items()}


def load_splits(
    data: str | Path,
    validation: str | Path | None = None,
    resolver: ImageResolver | None = None,
    *,
    what: str = "data",
    no_pairs_hint: str = NO_PAIRS_HINT,
    no_train_hint: str = "name the training subset train/ or pass that subset's folder",
) -> Splits:
    """Training and validation pairs of `data`: its 'train' subset (or its only one), and the 'validation'
    subset of `validation` when given, else of `data` (none: no validation).

    `what` names the data in errors (a CLI flag, an API argument); `no_pairs_hint` says how to fix a split
    with no usable pair, `no_train_hint` data without a training subset. Raises DataError for data that is
    not a dataset, has no training subset, or whose training or validation split has no usable pair.
    """
    subsets, reports = load_dataset(data, resolver)
    if TRAIN in subsets:
        train = subsets[TRAIN]
    elif len(subsets) == 1:
        (name, train), = subsets.items()
        reports = {TRAIN: reports.pop(name), **reports}
    else:
        raise DataError(f"{what} {str(data)!r}: no 'train' subset among {sorted(subsets)}; {no_train_hint}")
    val = subsets.get(VALIDATION)
    if validation is not None:
        val_sets, val_reports = load_dataset(validation, resolver, single_name=VALIDATION)
        name = VALIDATION if VALIDATION in val_sets else next(iter(val_sets))
        val, reports[VALIDATION] = val_sets[name], val_reports[name]
    splits = Splits(train, val, reports)
    for name in (TRAIN, VALIDATION):
        if name in reports and getattr(splits, name) is not None:
            source = validation if name == VALIDATION and validation is not None else data
            require_pairs(name, getattr(splits, name), reports[name], _subset_folder(source, name), no_pairs_hint)
    return splits


def load_dataset(
    path: str | Path, resolver: ImageResolver | None = None, single_name: str = TRAIN
) -> tuple[dict[str, list[CaptionPair]], dict[str, DataReport]]:
    """Read a table, one subset download, or a folder of subset downloads into {split: pairs}; a table or a
    single subset is split `single_name`. Returns the pairs and a DataReport per split (also logged)."""
    path = Path(path)
    readers: dict[str, Callable[[DataReport], list[CaptionPair]]]
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        readers = {single_name: lambda r: read_table(path, r)}
    elif path.is_dir() and _is_subset(path):
        readers = {single_name: lambda r: read_subset(path, resolver, r)}
    elif path.is_dir() and (subsets := sorted(d for d in path.iterdir() if d.is_dir() and _is_subset(d))):
        readers = {name: _subset_reader(d, resolver) for name, d in _split_names(path, subsets).items()}
    else:
        raise DataError(_layout_message(path))
    splits, reports = {}, {}
    for name, read in readers.items():
        reports[name] = DataReport()
        splits[name] = read(reports[name])
        level = logging.WARNING if reports[name].total_skipped else logging.INFO
        logger.log(level, "%s: %s", name, reports[name].summary())
    return splits, reports


def require_pairs(name: str, pairs: list[CaptionPair], report: DataReport, folder: str | Path | None = None,
                  hint: str = NO_PAIRS_HINT) -> None:
    """DataError naming the split, what reading it (a subset download `folder`) met and how to fix it, when it
    has no usable pair."""
    if pairs:
        return
    json_dir = Path(folder) / "json" if folder is not None else None
    items = f"{sum(1 for _ in json_dir.rglob('*.json'))} items, " if json_dir is not None and json_dir.is_dir() else ""
    raise DataError(
        f"{name}: {items}{report.summary()}; no usable image-caption pairs: give each image a caption (its "
        f"description, or a free-text annotation on each prompt), {hint}"
    )


def _subset_folder(data: str | Path, name: str) -> Path | None:
    """The subset download that split `name` of `data` was read from (None for a table)."""
    path = Path(data)
    for folder in (path / name, path):
        if (folder / "json").is_dir():
            return folder
    return None


def _split_names(root: Path, folders: list[Path]) -> dict[str, Path]:
    """{split: folder}: train/training, validation/val/valid/dev and test/testing as the canonical split names,
    any other folder under its own name. Two spellings of one split are an error (which one is meant?)."""
    canonical = {alias: split for split, aliases in SPLIT_NAMES.items() for alias in aliases}
    named: dict[str, Path] = {}
    for folder in folders:
        name = canonical.get(folder.name.lower(), folder.name)
        if name in named:
            raise DataError(f"{str(root)!r} has two subsets for the {name!r} split: {named[name].name}/ and "
                            f"{folder.name}/; keep one, or pass the subset folder you mean")
        named[name] = folder
    return named


def _subset_reader(folder: Path, resolver: ImageResolver | None) -> Callable[[DataReport], list[CaptionPair]]:
    return lambda report: read_subset(folder, resolver, report)


def _is_subset(folder: Path) -> bool:
    return (folder / "items").is_dir() or (folder / "json").is_dir()


def _layout_message(path: Path) -> str:
    problem = file_problem(path)
    if not path.is_dir() and problem is not None and problem[0] != "a folder":
        found = f"it {problem[1]}"  # does not exist; is a FIFO, a device, a symlink loop
    elif path.is_file():
        found = f"it is a {path.suffix or 'suffix-less'} file"
    else:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:10]
        found = f"it holds {names}" if names else "it is empty"
    return (
        f"data path {str(path)!r} is not a dataset ({found}); give one of: a .csv/.tsv/.jsonl table with "
        "image and caption columns; a Dataloop subset download (a folder with items/ and json/); or a "
        "folder of such subsets (train/, validation/, ...)"
    )
