"""THE choice of training, validation and test data, for every entry point (CLI, Python API, Dataloop adapter).

A data path is a table (.csv/.tsv/.jsonl), one Dataloop subset download (a folder with items/ and json/), a
folder of such subsets (train/, validation/, test/, ...), or a folder per class (`cat/*.jpg`, optionally under
train/, validation/, test/). `load_splits` reads it (and optional separate validation and test paths) into
`Splits`: the training pairs, the pairs that select the best epoch (validation, else a held-out part of train),
the test pairs scored once at the end, and per split a DataReport of what was used and skipped (exact
duplicates, pairs also in train). Training writes those reports to data_report.json beside the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig
from ..errors import DataError
from ..inputs import file_problem
from ..sections import DataSection
from .dataloop import ImageResolver, read_subset
from .labels import DEFAULT_TEMPLATE, is_class_folder_layout, read_class_folders
from .pairs import CaptionPair, DataReport
from .split import SplitOptions, drop_duplicate_pairs, drop_train_overlap, hold_out
from .tables import TABLE_SUFFIXES, read_table

logger = logging.getLogger(__name__)

TRAIN, VALIDATION, TEST = "train", "validation", "test"
RETENTION = "retention"  # what the base model knew and must not lose (docs/retention.md); scored, never trained on
# The folder names a folder of subsets may use for each split (case-insensitive); other names are kept as they are.
SPLIT_NAMES = {TRAIN: ("train", "training"), VALIDATION: ("validation", "val", "valid", "dev"),
               TEST: ("test", "testing")}
NO_PAIRS_HINT = "or point to other data"


@dataclass
class Splits:
    """The pairs a run trains on, selects its best epoch with (validation: given, or held out from train) and
    scores once at the end (test), and what reading each split used and skipped (training adds the images it
    could not decode to the train report)."""

    train: list[CaptionPair]
    validation: list[CaptionPair] | None = None
    reports: dict[str, DataReport] = field(default_factory=dict)
    test: list[CaptionPair] | None = None
    held_out: bool = False  # validation was held out from the training data (none was given)
    retention: list[CaptionPair] | None = None  # scored before and after, never trained on (none: no retention check)

    def report(self, name: str) -> DataReport:
        """The report of split `name`, created empty for in-memory pairs."""
        return self.reports.setdefault(name, DataReport(used=len(getattr(self, name) or [])))

    def report_dict(self) -> dict[str, Any]:
        """What data_report.json holds: {split: {used, skipped, examples[, note]}}."""
        return {name: r.to_dict() for name, r in self.reports.items()}


def load_splits(
    data: str | Path,
    validation: str | Path | None = None,
    resolver: ImageResolver | None = None,
    *,
    test: str | Path | None = None,
    cfg: FinetuneConfig | DataSection | SplitOptions | None = None,
    what: str = "data",
    no_pairs_hint: str = NO_PAIRS_HINT,
    no_train_hint: str = "name the training subset train/ or pass that subset's folder",
    retention: str | Path | None = None,
) -> Splits:
    """Training, validation and test pairs of `data`: its 'train' subset (or its only one); the 'validation'
    subset of `validation` when given, else of `data`, else a held-out part of train (cfg.holdout_fraction);
    the 'test' subset of `test` when given, else of `data` (none: no test split); the 'retention' set of
    `retention` when given (its 'retention' subset, else its test, validation or only one), else the 'retention'
    subset of `data` (none: no retention check).

    Exact duplicate pairs are dropped in every split, and validation/test pairs also in train (item id, image
    path or content) when cfg.drop_train_overlap; each is warned about and counted in the split's report.
    `what` names the data in errors (a CLI flag, an API argument); `no_pairs_hint` says how to fix a split
    with no usable pair, `no_train_hint` data without a training subset. Raises DataError for data that is
    not a dataset, has no training subset, or whose training, validation or test split has no usable pair.
    """
    opts = cfg if isinstance(cfg, SplitOptions) else SplitOptions.of(cfg)
    subsets, reports = load_dataset(data, resolver, label_template=opts.label_template,
                                    column_names=opts.column_names)
    if TRAIN in subsets:
        train = subsets[TRAIN]
    elif len(subsets) == 1:
        (name, train), = subsets.items()
        reports = {TRAIN: reports.pop(name), **reports}
    else:
        raise DataError(f"{what} {str(data)!r}: no 'train' subset among {sorted(subsets)}; {no_train_hint}")
    parts: dict[str, list[CaptionPair] | None] = {TRAIN: train}
    sources: dict[str, str | Path] = {TRAIN: data}
    for name, path in ((VALIDATION, validation), (TEST, test), (RETENTION, retention)):
        parts[name], sources[name] = subsets.get(name), data
        if path is not None:
            extra_sets, extra_reports = load_dataset(path, resolver, single_name=name,
                                                     label_template=opts.label_template,
                                                     column_names=opts.column_names)
            chosen = next((n for n in (name, TEST, VALIDATION) if n in extra_sets), next(iter(extra_sets)))
            parts[name], reports[name], sources[name] = extra_sets[chosen], extra_reports[chosen], path
    if parts[TEST] is not None and not parts[TEST] and not reports[TEST].total_skipped:
        logger.warning("test: the subset is empty; no test split (the report's 'after' is the selection set)")
        parts[TEST] = None
        reports.pop(TEST)
    for name, pairs in parts.items():
        if pairs is not None and name in reports:
            require_pairs(name, pairs, reports[name], _subset_folder(sources[name], name), no_pairs_hint)
            parts[name] = drop_duplicate_pairs(name, pairs, reports[name])
    return _guard(Splits(parts[TRAIN] or [], parts[VALIDATION], reports, parts[TEST], retention=parts[RETENTION]),
                  opts)


def _guard(splits: Splits, opts: SplitOptions) -> Splits:
    """Hold out a validation split when none was given; drop validation/test pairs that are also in train."""
    if splits.validation is None and (held := hold_out(splits.train, opts, splits.report(TRAIN))) is not None:
        splits.train, splits.validation, splits.reports[VALIDATION] = held
        splits.held_out = True
    # the test split must be unseen by training and by the selection (validation picks the epoch): a test split
    # copied from validation would score the model on what chose it; a held-out validation is train's, checked
    checks = [(VALIDATION, TRAIN), (TEST, TRAIN), (RETENTION, TRAIN)] + (
        [(TEST, VALIDATION)] if not splits.held_out else [])
    for name, against in checks:
        pairs, reference = getattr(splits, name), getattr(splits, against)
        if not pairs or reference is None or splits.held_out and name == VALIDATION:
            continue
        kept = drop_train_overlap(name, reference, pairs, splits.report(name), opts.drop_train_overlap, against,
                                  opts.picture_distance)
        if not kept:
            raise DataError(f"{name}: all {len(pairs)} pairs are also in {against} (the same items or images), so "
                            "it cannot score the model honestly; give it other items, or set drop_train_overlap to "
                            "false to score on them anyway")
        setattr(splits, name, kept)
    return splits


def load_dataset(
    path: str | Path, resolver: ImageResolver | None = None, single_name: str = TRAIN,
    label_template: str = DEFAULT_TEMPLATE, column_names: tuple[str | None, str | None] = (None, None),
) -> tuple[dict[str, list[CaptionPair]], dict[str, DataReport]]:
    """Read a table, one subset download, a folder of subset downloads, or a folder per class (itself or under
    subset folders) into {split: pairs}; a table, a single subset or a class folder is split `single_name`;
    `column_names`: a table's (image, caption) columns, None for the usual names.
    Returns the pairs and a DataReport per split (also logged)."""
    path = Path(path)
    readers: dict[str, Callable[[DataReport], list[CaptionPair]]]
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        readers = {single_name: lambda r: read_table(path, r, label_template, column_names)}
    elif path.is_dir() and _is_subset(path):
        readers = {single_name: lambda r: read_subset(path, resolver, r, label_template)}
    elif path.is_dir() and (subsets := sorted(d for d in path.iterdir() if d.is_dir() and _is_subset(d))):
        named = _split_names(path, subsets)
        readers = {name: _subset_reader(d, resolver, label_template) for name, d in named.items()}
    elif path.is_dir() and (classes := _class_folder_subsets(path)):
        readers = {name: _class_reader(d, label_template) for name, d in classes.items()}
    elif path.is_dir() and is_class_folder_layout(path):
        readers = {single_name: _class_reader(path, label_template)}
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


def _subset_reader(folder: Path, resolver: ImageResolver | None, label_template: str
                   ) -> Callable[[DataReport], list[CaptionPair]]:
    return lambda report: read_subset(folder, resolver, report, label_template)


def _class_reader(folder: Path, label_template: str) -> Callable[[DataReport], list[CaptionPair]]:
    return lambda report: read_class_folders(folder, report, label_template)


def _class_folder_subsets(path: Path) -> dict[str, Path]:
    """{train/validation/test: folder} when `path` holds such subsets, each a folder per class, under any of the
    split names a folder of subset downloads may use (SPLIT_NAMES, any case: Train/, val/, Validation/): read as
    one folder per class, Validation/cat/ would be trained on as the class 'cat'."""
    canonical = {alias: split for split, aliases in SPLIT_NAMES.items() for alias in aliases}
    folders = [d for d in path.iterdir() if d.is_dir() and d.name.lower() in canonical and is_class_folder_layout(d)]
    if not folders:
        return {}
    found = _split_names(path, sorted(folders))
    if TRAIN not in found:
        raise DataError(f"{str(path)!r} holds {', '.join(sorted(d.name + '/' for d in found.values()))} (a folder per "
                        "class for each split) but no train/ (or training/) folder; add one, or pass the folder of "
                        "the classes to train on")
    return found


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
        "image and caption (or label) columns; a Dataloop subset download (a folder with items/ and json/); a "
        "folder of such subsets (train/, validation/, ...); or a folder per class (cat/, dog/, ...)"
    )
