"""Selection: which epoch is the best so far (by the configured metric on the validation pairs) and when to stop
early; its state travels in the checkpoint, so a resumed run judges its epochs as the uninterrupted one would."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from ..sections import SelectionSection

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Selection:
    """The best epoch and early stopping. Without validation every epoch counts as the best and nothing stops."""

    metric: str  # the validation score that picks the best epoch (higher is better)
    has_validation: bool
    early_stopping: bool = True
    patience: int = 3  # epochs without a gain before stopping early
    best_score: float = -math.inf
    best_epoch: int = 0  # 0: no epoch beat the base model (so far)
    stale: int = 0  # epochs since the best

    @classmethod
    def of(cls, section: SelectionSection, has_validation: bool) -> Selection:
        return cls(metric=section.early_stopping_metric, has_validation=has_validation,
                   early_stopping=section.early_stopping, patience=section.early_stopping_epochs)

    def start(self, base_scores: dict[str, float]) -> None:
        """The base model's scores are the ones to beat."""
        self.best_score = base_scores.get(self.metric, -math.inf)

    def judge(self, epoch: int, record: dict[str, float]) -> tuple[bool, bool]:
        """Judge epoch `epoch` by its history line: (improved on the best so far, stop early)."""
        improved = not self.has_validation or record[self.metric] > self.best_score  # NaN never improves
        if improved:
            self.best_score, self.best_epoch, self.stale = record.get(self.metric, math.nan), epoch, 0
        else:
            self.stale += 1
        if self.has_validation:
            log.info("epoch %d: loss %.4f, %s %.4f%s", epoch, record["train_loss"], self.metric, record[self.metric],
                     " (best)" if improved else "")
        else:
            log.info("epoch %d: loss %.4f", epoch, record["train_loss"])
        stop = self.has_validation and self.early_stopping and self.stale >= self.patience
        if stop:
            log.info("early stopping: no %s gain for %d epochs", self.metric, self.stale)
        return improved, stop

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the bookkeeping of a checkpoint written with the same settings (else ValueError)."""
        settings = ("metric", "has_validation", "early_stopping", "patience")
        if any(state[k] != getattr(self, k) for k in settings):
            raise ValueError(f"the checkpoint selects by {({k: state[k] for k in settings})}")
        self.best_score, self.best_epoch, self.stale = state["best_score"], state["best_epoch"], state["stale"]
