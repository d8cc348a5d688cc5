"""What keeps scores honest once the splits are read: exact duplicate pairs dropped, a held-out split when no
validation data is given, and validation/test pairs that are also in train (same item, path or image content)
dropped. Each step is logged and counted in the split's DataReport (data_report.json); docs/data.md."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import FinetuneConfig
from ..sections import DataSection
from .identity import content_key, linked_groups, normalise_caption
from .labels import DEFAULT_TEMPLATE
from .pairs import CaptionPair, DataReport, has_item_id, item_key
from .perceptual import PictureIndex

logger = logging.getLogger(__name__)

MIN_HOLDOUT_PAIRS = 10  # fewer held-out pairs would pick the epoch by noise: then the last epoch counts


def _default(name: str) -> object:
    return FinetuneConfig.model_fields[name].default


@dataclass(frozen=True)
class SplitOptions:
    """The configuration keys that shape the splits (config.py holds their defaults and descriptions)."""

    holdout_fraction: float = _default("holdout_fraction")  # type: ignore[assignment]
    holdout_max_pairs: int = _default("holdout_max_pairs")  # type: ignore[assignment]
    seed: int = _default("seed")  # type: ignore[assignment]
    drop_train_overlap: bool = _default("drop_train_overlap")  # type: ignore[assignment]
    label_template: str = DEFAULT_TEMPLATE
    picture_distance: int | None = None  # leakage_picture_distance: the perceptual check (data/perceptual.py)
    column_names: tuple[str | None, str | None] = (None, None)  # a table's (image, caption) columns

    @classmethod
    def of(cls, cfg: FinetuneConfig | DataSection | None) -> SplitOptions:
        if cfg is None:
            return cls()
        return cls(cfg.holdout_fraction, cfg.holdout_max_pairs, cfg.seed, cfg.drop_train_overlap,
                   cfg.label_templates[0], cfg.leakage_picture_distance, (cfg.image_column, cfg.caption_column))


def drop_duplicate_pairs(name: str, pairs: list[CaptionPair], report: DataReport) -> list[CaptionPair]:
    """The pairs without exact duplicates (the same image content with the same normalised caption): a repeated
    row would count twice in the loss and in the scores."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for p in pairs:
        key = (content_key(p.image), normalise_caption(p.caption))
        if key in seen:
            report.drop("duplicate pair", p.item_id or p.image)
        else:
            seen.add(key)
            kept.append(p)
    if len(kept) < len(pairs):
        logger.warning("%s: dropped %d exact duplicate pairs (same image content and caption)", name,
                       len(pairs) - len(kept))
    return kept


def hold_out(train: list[CaptionPair], opts: SplitOptions, report: DataReport
             ) -> tuple[list[CaptionPair], list[CaptionPair], DataReport] | None:
    """Split a seeded ~holdout_fraction (at most holdout_max_pairs) of `train` off to select the best epoch:
    (train left, held out, its report). Whole groups move (linked_groups), so no image and no written caption
    is on both sides. None when there is too little data for MIN_HOLDOUT_PAIRS."""
    target = min(round(opts.holdout_fraction * len(train)), opts.holdout_max_pairs)
    if opts.holdout_fraction <= 0:
        return None
    if target < MIN_HOLDOUT_PAIRS <= len(train) // 4 and all(p.templated for p in train):
        # class folders are often small (48 images: a 10% hold-out is 5 pairs, too few): rather than no held-out
        # scores at all, hold out the minimum while it leaves three quarters of the pairs to train on
        target = MIN_HOLDOUT_PAIRS
    if target < MIN_HOLDOUT_PAIRS:
        logger.warning("no validation data, and %d training pairs are too few to hold out %d: the last epoch "
                       "counts as the best", len(train), MIN_HOLDOUT_PAIRS)
        return None
    groups = linked_groups(train)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(i)
    chosen: list[int] = []
    for g in np.random.default_rng(opts.seed).permutation(len(members)).tolist():
        if len(chosen) + len(members[g]) <= target:  # a group too big for what is left is passed over
            chosen += members[g]
        if len(chosen) >= target:
            break
    if len(chosen) < MIN_HOLDOUT_PAIRS or len(chosen) == len(train):
        logger.warning("no validation data, and the training pairs share images or captions too widely to hold "
                       "out %d pairs: the last epoch counts as the best", target)
        return None
    held_set = set(chosen)
    kept = [p for i, p in enumerate(train) if i not in held_set]
    held = [train[i] for i in sorted(chosen)]
    report.used -= len(held)
    note = (f"held out from train: {len(held)} of {len(train)} pairs ({opts.holdout_fraction:g}, at most "
            f"{opts.holdout_max_pairs}; seed {opts.seed}), whole groups sharing an image or a caption")
    logger.info("no validation data: %s; they pick the best epoch and are not trained on", note)
    return kept, held, DataReport(used=len(held), note=note)


def drop_train_overlap(name: str, train: Sequence[CaptionPair], pairs: list[CaptionPair], report: DataReport,
                       drop: bool = True, against: str = "train", picture_distance: int | None = None
                       ) -> list[CaptionPair]:
    """`pairs` (validation or test) without those also in train (or the split `against` names, e.g. test
    against validation): the same item id, image path or image content, and with `picture_distance` the same
    picture (a perceptual hash within that many bits). Counted per reason in `report` (dropped) or its note
    (drop=False: kept), and warned about."""
    ids = {item_key(p) for p in train if has_item_id(p)}
    paths = {os.path.normpath(p.image) for p in train}
    contents = {content_key(p.image) for p in train}
    pictures = PictureIndex(p.image for p in train) if picture_distance is not None else None
    counts: Counter[str] = Counter()
    kept = []
    for p in pairs:
        if has_item_id(p) and item_key(p) in ids:
            reason = "item id"
        elif os.path.normpath(p.image) in paths:
            reason = "image path"
        elif content_key(p.image) in contents:
            reason = "image content"
        elif pictures is not None and (bits := pictures.nearest(p.image)) is not None and bits <= picture_distance:
            reason = "same picture"
        else:
            kept.append(p)
            continue
        counts[reason] += 1
        if drop:
            report.drop(f"also in {against} ({reason})", p.item_id or p.image)
        else:
            kept.append(p)
    if counts:
        found = ", ".join(f"{n} by {reason}" for reason, n in counts.most_common())
        action = "dropped, so they do not inflate its scores" if drop else "kept (drop_train_overlap is false)"
        logger.warning("%s: %d pairs are also in %s (%s): %s", name, sum(counts.values()), against, found, action)
        if not drop:
            note = f"{sum(counts.values())} pairs also in {against} ({found}), kept"
            report.note = f"{report.note}; {note}" if report.note else note
    return kept
