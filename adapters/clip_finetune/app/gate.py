"""The promotion rule, said once for every face (the Dataloop gate in dataloop/promotion.py, `clip-finetune gate`):
a new model replaces the current one when it is better on the target data by more than the margin AND, where a
retention set is named, its score there is at most `tolerance` below the current model's (docs/retention.md).
A model that wins on the target and forgets what the current one knew is refused, and the verdict says why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import FinetuneConfig
from ..data.pairs import CaptionPair
from ..retrieval.metrics import LOWER_IS_BETTER

if TYPE_CHECKING:
    from ..model.clip import ClipModel

PROMOTED, KEPT = "promoted", "kept"


def better(new: float, old: float, metric: str, margin: float) -> bool:
    """Strictly better by more than `margin` (ranks: lower is better)."""
    if metric.endswith(LOWER_IS_BETTER):
        return new < old - margin
    return new > old + margin


def retention_loss(new: dict[str, float], reference: dict[str, float], metric: str, tolerance: float,
                   reference_name: str = "the current model") -> str:
    """Why `new` is refused on the retention set: its `metric` is worse than `reference`'s by more than
    `tolerance`; '' when it is not (or either score is missing)."""
    if metric not in new or metric not in reference:
        return ""
    drop = new[metric] - reference[metric] if metric.endswith(LOWER_IS_BETTER) else reference[metric] - new[metric]
    if drop <= tolerance + 1e-9:  # 1e-9: float sums of two-decimal figures
        return ""
    return (f"refused on retention: {metric} on the retention set fell from {reference[metric]:.4f} "
            f"({reference_name}) to {new[metric]:.4f}, {drop:.4f} more than the tolerance allows "
            f"(retention_tolerance {tolerance:g}), however it scores on the target")


@dataclass
class GateVerdict:
    """What the rule decided and why; the retention figures are empty without a retention set."""

    promoted: bool
    metric: str
    margin: float
    new: dict[str, float]
    current: dict[str, float]
    tolerance: float = 0.01
    new_retention: dict[str, float] = field(default_factory=dict)
    current_retention: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def summary(self) -> str:
        old = self.current.get(self.metric)
        against = f"{old:.4f} of the current model" if old is not None else "no current model"
        text = f"{self.metric} {self.new[self.metric]:.4f} vs {against} (margin {self.margin:g}): " + (
            PROMOTED if self.promoted else KEPT)
        if self.reason:
            text += f"; {self.reason}"
        elif not self.new_retention:
            text += "; no retention set checked"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(new: dict[str, float], current: dict[str, float], metric: str, margin: float,
           new_retention: dict[str, float] | None = None, current_retention: dict[str, float] | None = None,
           tolerance: float = 0.01) -> GateVerdict:
    """The verdict on target scores (`current` empty: no model to beat, promoted) and retention scores."""
    verdict = GateVerdict(not current or better(new[metric], current[metric], metric, margin), metric,
                          float(margin), dict(new), dict(current), float(tolerance), dict(new_retention or {}),
                          dict(current_retention or {}))
    verdict.reason = retention_loss(verdict.new_retention, verdict.current_retention, metric, tolerance)
    if verdict.reason:
        verdict.promoted = False
    elif current and not verdict.promoted:
        verdict.reason = f"not better on the target by more than the margin {margin:g}"
    return verdict


def compare_models(new: ClipModel, current: ClipModel, pairs: list[CaptionPair], cfg: FinetuneConfig,
                   retention: list[CaptionPair] | None = None, metric: str | None = None, margin: float = 0.0
                   ) -> GateVerdict:
    """Both models scored on the same target pairs (and retention pairs), then decide()."""
    from .evaluate import score, score_in_galleries

    metric = metric or cfg.early_stopping_metric
    scores = [score(m, pairs, cfg) for m in (new, current)]
    kept = [score_in_galleries(m, retention, cfg).metrics() for m in (new, current)] if retention else [{}, {}]
    return decide(scores[0], scores[1], metric, margin, kept[0], kept[1], cfg.retention_tolerance)
