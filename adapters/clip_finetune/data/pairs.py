"""The unit of training data, shared by every reader, the trainer and the evaluator."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CaptionPair:
    """One image and one caption describing it.

    Several pairs may share an image (several captions per image); evaluation groups them by `image`.
    """

    image: str  # path of a local image file
    caption: str
    item_id: str = ""  # id of the item (or CSV row) the pair came from, for reports


@dataclass
class DataReport:
    """What a reader used and what it skipped, per reason, with a few example ids for each reason."""

    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.used} pairs used, none skipped"
        parts = ", ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})"
                          for reason, n in self.skipped.most_common())
        return f"{self.used} pairs used, {self.total_skipped} skipped: {parts}"

    def to_dict(self) -> dict:
        return {"used": self.used, "skipped": dict(self.skipped), "examples": self.examples}
