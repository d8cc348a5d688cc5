"""The promotion gate: a newly trained model replaces the current one only when it retrieves better on a test
subset (items neither training nor the choice of the best epoch saw), by a configurable metric and margin.

Dataloop's Active Learning template puts its compare step (compare_models) between evaluation and the
updateVariable node the same way; here both models are evaluated by this app's own retrieval evaluation, on the
same items, in the gate itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import dtlpy as dl

from adapters.clip_finetune.app.gate import KEPT, PROMOTED, better, retention_loss  # the node's output actions
from adapters.clip_finetune.config import FinetuneConfig, metric_names
from adapters.clip_finetune.errors import ConfigError
from adapters.clip_finetune.retrieval.evaluation_result import EvaluationResult, compare_queries, direction_of

from .charts import publish

if TYPE_CHECKING:
    from .adapter import ClipAdapter

logger = logging.getLogger(__name__)

DEFAULT_METRIC = FinetuneConfig.model_fields["early_stopping_metric"].default  # what training optimises
RETENTION_KEYS = ("retention_filters", "retention_tolerance")  # compare_config's retention check (docs/retention.md)
METADATA_KEY = "clip_finetune"  # model.metadata["user"][METADATA_KEY]["promotion"]: the gate's record


@dataclass
class Verdict:
    """What the gate decided and why; written to the new model's metadata."""

    promoted: bool
    metric: str
    margin: float
    dataset_id: str
    filters: Any
    new: dict[str, float]
    previous: dict[str, float] = field(default_factory=dict)
    previous_model_id: str | None = None
    previous_model_name: str | None = None
    # per query, from both evaluations (evaluation_result.compare_queries): how many got better or worse
    queries: dict[str, Any] = field(default_factory=dict)
    # the retention check (app/gate.py): {"filters", "tolerance", "new", "previous"}, and why the model was refused
    retention: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def summary(self) -> str:
        old = self.previous.get(self.metric)
        against = f"{old:.4f} of {self.previous_model_name!r}" if old is not None else "no previous model"
        q = self.queries
        per_query = (f"; {q['direction']} queries: {q['better']} better, {q['worse']} worse, {q['same']} the same"
                     if q else "")
        why = f"; {self.reason}" if self.reason else "" if self.retention else "; no retention set checked"
        return (f"{self.metric} {self.new[self.metric]:.4f} vs {against} (margin {self.margin}): "
                f"{PROMOTED if self.promoted else KEPT}{per_query}{why}")


def compare_settings(compare_config: dict | None) -> tuple[str, float]:
    """(metric, margin) of the gate's compare_config ({"metric", "margin"}; both optional)."""
    config = dict(compare_config or {})
    unknown = sorted(set(config) - {"metric", "margin", *RETENTION_KEYS})
    if unknown:
        raise ConfigError(f"compare_config: unknown keys {unknown}; known: metric, margin, {', '.join(RETENTION_KEYS)}")
    metric, margin = config.get("metric", DEFAULT_METRIC), config.get("margin", 0.0)
    check_metric(metric, margin)
    return metric, float(margin)


def retention_settings(compare_config: dict | None, new_model: dl.Model, tolerance: float
                       ) -> tuple[dict | None, float]:
    """(filters, tolerance) of the retention check: compare_config's retention_filters, else the new model's
    'retention' subset (metadata.system.subsets.retention, the items it was trained to keep); None: no check.
    The tolerance: compare_config's retention_tolerance, else `tolerance` (the new model's configuration)."""
    config = dict(compare_config or {})
    filters = config.get("retention_filters")
    if filters is None:
        subset = (((new_model.metadata or {}).get("system") or {}).get("subsets") or {}).get("retention")
        filters = subset.get("filter", subset) if isinstance(subset, dict) else None
    tolerance = config.get("retention_tolerance", tolerance)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance <= 1:
        raise ConfigError(f"retention_tolerance: must be a number in [0, 1] (got {tolerance!r})")
    if filters is not None and not isinstance(filters, dict):
        raise ConfigError(f"retention_filters: must be a DQL filter object (got {filters!r:.80})")
    return filters, float(tolerance)


def check_metric(metric: str, margin: float) -> None:
    if metric not in metric_names():
        raise ConfigError(f"metric: unknown metric {metric!r}; known: {', '.join(metric_names())}")
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin) or margin < 0:
        raise ConfigError(f"margin: must be a number >= 0 (got {margin!r})")


def gate(adapter_for: Callable[[dl.Model], ClipAdapter], new_model: dl.Model, previous_model: dl.Model | None,
         dataset: dl.Dataset, filters: dict | None, metric: str = DEFAULT_METRIC, margin: float = 0.0,
         retention: tuple[dict | None, float] = (None, 0.01)) -> Verdict:
    """Evaluate both models on the same items and decide; with `retention` filters (and tolerance), both models
    on those items too: a new model worse there by more than the tolerance is kept out, however it scores on the
    target (app/gate.py). The verdict is written on the new model."""
    check_metric(metric, margin)
    scores, result = _scores(adapter_for, new_model, dataset, filters)
    verdict = Verdict(False, metric, float(margin), dataset.id, filters, scores)
    if previous_model is None or previous_model.id == new_model.id:
        verdict.promoted = True
    else:
        verdict.previous, previous_result = _scores(adapter_for, previous_model, dataset, filters)
        verdict.previous_model_id, verdict.previous_model_name = previous_model.id, previous_model.name
        verdict.promoted = better(verdict.new[metric], verdict.previous[metric], metric, margin)
        if result is not None and previous_result is not None:
            verdict.queries = compare_queries(result, previous_result, direction_of(metric))
        if retention[0] is not None:
            _check_retention(adapter_for, verdict, new_model, previous_model, dataset, retention)
    logger.info("promotion of model %r on dataset %r: %s", new_model.name, dataset.name, verdict.summary())
    record(new_model, verdict)
    return verdict


def _check_retention(adapter_for: Callable[[dl.Model], ClipAdapter], verdict: Verdict, new_model: dl.Model,
                     previous_model: dl.Model, dataset: dl.Dataset, retention: tuple[dict | None, float]) -> None:
    filters, tolerance = retention
    new, _ = _scores(adapter_for, new_model, dataset, filters, galleries=True)  # as training scores it
    previous, _ = _scores(adapter_for, previous_model, dataset, filters, galleries=True)
    verdict.retention = {"filters": filters, "tolerance": tolerance, "new": new, "previous": previous}
    verdict.reason = retention_loss(new, previous, verdict.metric, tolerance, repr(previous_model.name))
    if verdict.reason:
        verdict.promoted = False


def _scores(adapter_for: Callable[[dl.Model], ClipAdapter], model: dl.Model, dataset: dl.Dataset,
            filters: dict | None, galleries: bool = False) -> tuple[dict[str, float], EvaluationResult | None]:
    """The model's metrics on the items, and the per-query evaluation they were computed from; `galleries`: ranked
    in galleries of 1,000 images (a retention set, held to a tolerance in points)."""
    adapter = adapter_for(model)
    more = {"galleries": True} if galleries else {}  # a keyword only our adapter's evaluate reads
    adapter.evaluate(model=model, dataset=dataset, filters=filters, **more)  # publishes them on the model too
    return dict(adapter.evaluation), adapter.evaluation_result


def record(model: dl.Model, verdict: Verdict) -> None:
    """The verdict and both models' metrics in the new model's user metadata, and the compared metric as a chart."""
    model.metadata.setdefault("user", {}).setdefault(METADATA_KEY, {})["promotion"] = asdict(verdict)
    model.update(reload_services=False)
    samples = [dl.PlotSample(figure=f"promotion {verdict.metric}", legend=legend, x=0, y=scores[verdict.metric])
               for legend, scores in (("new model", verdict.new), ("previous model", verdict.previous)) if scores]
    publish(model, samples, verdict.dataset_id)


def superseded_by(model: dl.Model) -> str | None:
    """The id of the model `model` replaced when the gate promoted it, from its metadata."""
    promotion = ((model.metadata or {}).get("user") or {}).get(METADATA_KEY, {}).get("promotion") or {}
    return promotion.get("previous_model_id") if promotion.get("promoted") else None
