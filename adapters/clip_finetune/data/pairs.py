"""The unit of training data, shared by every reader, the trainer and the evaluator."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_ROW_ID = re.compile(r"row \d+")


def row_id(n: int) -> str:
    """The id of a table row without an id column: its number (the same number in two tables is no link)."""
    return f"row {n}"


def item_key(pair: CaptionPair) -> tuple[str, str]:
    """The pair's item identity across splits: its item id within its id scope."""
    return pair.id_scope, pair.item_id


def has_item_id(pair: CaptionPair) -> bool:
    """True when the pair's item_id names an item (a Dataloop id, a table's id column), not a row number."""
    return bool(pair.item_id) and not _ROW_ID.fullmatch(pair.item_id)


@dataclass(frozen=True)
class CaptionPair:
    """One image and one caption describing it.

    Several pairs may share an image (several captions per image); evaluation groups them by `image`.
    """

    image: str  # path of a local image file
    caption: str
    item_id: str = ""  # id of the item (or CSV row) the pair came from, for reports
    label: str = ""  # the class label of the image (leaf of a hierarchy), for zero-shot classification
    templated: bool = False  # the caption was made from `label` by a template, not written for this image
    # where item_id is unique: "" for platform ids (one item, one id everywhere), a table's path for its id column
    # (train.csv and val.csv may each number their rows 1..N). Not part of equality: a scope, not content.
    id_scope: str = field(default="", compare=False)


@dataclass
class DataReport:
    """What a reader used and what it skipped, per reason, with a few example ids for each reason."""

    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5
    note: str = ""  # where the split came from when it was not read as is (held out from train)
    from_labelling: int = 0  # pairs read from items a labelling task of failed searches made (docs/labelling-loop.md)

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    def drop(self, reason: str, example: str) -> None:
        """A pair read and counted as used, then left out (a duplicate, an overlap with train)."""
        self.skip(reason, example)
        self.used -= 1

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        used = f"{self.used} pairs used" + (f" ({self.from_labelling} from labelling)" if self.from_labelling else "")
        if not self.skipped:
            return f"{used}, none skipped"
        parts = ", ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})"
                          for reason, n in self.skipped.most_common())
        return f"{used}, {self.total_skipped} skipped: {parts}"

    def to_dict(self) -> dict:
        out = {"used": self.used, "skipped": dict(self.skipped), "examples": self.examples}
        if self.from_labelling:
            out["from_labelling"] = self.from_labelling
        return {**out, "note": self.note} if self.note else out
