"""The retention check and automatic WiSE-FT (docs/retention.md): what the base model already knew is scored before
training and after it, and the weights shipped are the WiSE-FT mix (Wortsman et al. 2022) of the best epoch and the
base that scores best on validation while the retention set stays within `retention_tolerance` of the base's.

The sweep re-embeds only what the mix changes: every alpha is a new model, so the features are computed again,
but the images are decoded and preprocessed once (each set's EvalCache keeps its inputs); alpha 0 is the base model,
scored before training, and alpha 1 the best epoch, scored when it was picked: neither is evaluated again.

Precedence, said once: an explicit `wise_ft_alpha` below 1 > `wise_ft_auto` > plain fine-tuning (alpha 1).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import FinetuneConfig
from ..data.decode_cache import InputCache, transform_size
from ..data.load import Splits
from ..model.clip import ClipModel
from ..model.weights import cpu_state, unwrap, wise_ft
from ..retrieval.eval_cache import BaseEvalStore, EvalCache, cache_dir
from ..retrieval.evaluation_result import EvaluationResult, change_standard_error, direction_of, galleries, merge

if TYPE_CHECKING:
    from .state import RunState, TrainResult

log = logging.getLogger(__name__)

GRID = tuple(i / 10 for i in range(11))  # the alphas auto WiSE-FT tries: 0, 0.1, ..., 1
Score = Callable[..., dict[str, float]]  # loop._score(run, pairs, progress=False, cache=None)
NO_RETENTION = ("no retention set: nothing measured what the base model knew before this training and must not "
                "lose; add one with `clip-finetune train --retention DATA`, fit(..., retention=DATA) or, on "
                "Dataloop, a 'retention' subset on the model (docs/retention.md)")

SMALL_RETENTION = "the retention set is small"  # how resolution_note's note begins


@dataclass
class Point:
    """One alpha of the sweep: its validation metrics and its retention metrics ({} without a retention set)."""

    alpha: float
    validation: dict[str, float]
    retention: dict[str, float]
    evaluation: EvaluationResult | None = None  # the validation per query, for per_query.json
    retention_se: float | None = None  # the standard error of the retention change from the base (paired)

    def row(self, metric: str) -> dict[str, Any]:
        """The curve's entry: {alpha, target, retention, retention_se} (the last two None without a retention
        set)."""
        return {"alpha": self.alpha, "target": self.validation.get(metric), "retention": self.retention.get(metric),
                "retention_se": self.retention_se}


def has_weights(cfg: FinetuneConfig) -> bool:
    """Whether the base model has trained weights (a pretrained tag, a weights file, a saved model folder, a hub
    model): a random init knows nothing that mixing with it would keep."""
    return cfg.pretrained is not None or cfg.model_name.startswith(("hf-hub:", "local-dir:"))


def auto_wanted(cfg: FinetuneConfig, splits: Splits) -> bool:
    """Whether auto WiSE-FT runs: on, no explicit alpha below 1, a base with weights, and validation pairs to pick
    alpha with."""
    return cfg.wise_ft_auto and cfg.wise_ft_alpha == 1 and has_weights(cfg) and bool(splits.validation)


def keeps_base(cfg: FinetuneConfig, splits: Splits) -> bool:
    """Whether the run keeps a CPU copy of the starting weights to mix with (WiSE-FT, fixed or automatic)."""
    return cfg.wise_ft_alpha < 1 or auto_wanted(cfg, splits)


def choose(points: Sequence[Point], metric: str, tolerance: float) -> Point:
    """The point with the best target `metric` among those whose retention is at most `tolerance` below alpha 0's
    (the base model's); all of them without a retention set. Ties go to the higher retention, then the smaller
    alpha (closer to the base). Alpha 0 always qualifies, so there is always a choice."""
    base = next(p for p in points if p.alpha == 0)
    floor = base.retention.get(metric, -math.inf) - tolerance - 1e-9  # 1e-9: the float sum of 0.9 + 0.01

    def kept(p: Point) -> bool:
        return p.retention.get(metric, math.inf) >= floor

    return max((p for p in points if kept(p)),
               key=lambda p: (p.validation.get(metric, -math.inf), p.retention.get(metric, 0.0), -p.alpha))


def retention_cache(cfg: FinetuneConfig, clip: ClipModel, pairs: list | None, budget_mb: float
                    ) -> tuple[EvalCache | None, float]:
    """The EvalCache of the retention set (its preprocessed images kept for every alpha of the sweep) and what is
    left of `budget_mb` for the training images; (None, budget_mb) without a retention set."""
    if not pairs:
        return None, budget_mb
    side = transform_size(clip.preprocess)
    need_mb = len({p.image for p in pairs}) * side * side * 3 / 2**20 if side else 0.0
    mb = min(max(budget_mb, 0.0), need_mb)
    store = BaseEvalStore(cache_dir()) if cfg.base_eval_cache else None
    return EvalCache(InputCache(clip.preprocess, mb, side), store), budget_mb - mb


def score_retention(run: RunState, pairs: list | None, score: Score, base: bool = False) -> dict[str, float]:
    """The retention metrics of the model as it is now ({} without a retention set); `base`: the starting
    weights, whose embeddings the base-model store may hold, and whose per-query result is kept as
    run.retention_base. The run's latest (validation) evaluation is kept."""
    return _retention(run, pairs, score, base)[0]


def _retention(run: RunState, pairs: list | None, score: Score, base: bool = False
               ) -> tuple[dict[str, float], float | None]:
    """score_retention's metrics, and the standard error of the change of the selection metric from the base
    (change_standard_error; None for the base itself, or when the base's per-query result is not at hand)."""
    if not pairs or not run.is_main:
        return {}, None
    kept, cache = run.evaluation, run.retention_cache
    with cache.storing() if base and cache is not None else nullcontext():  # galleries of 1,000 images at most
        results = [(score(run, gallery, cache=cache), run.evaluation) for gallery in galleries(pairs)]
    run.evaluation, now = kept, merge([r for _, r in results])
    scores = results[0][0] if len(results) == 1 else now.metrics()  # one gallery: the metrics it was scored to
    if base:
        run.retention_base = now
        return scores, None
    if now is None or run.retention_base is None:
        return scores, None
    return scores, change_standard_error(now, run.retention_base, run.cfg.early_stopping_metric)


def resolution_note(se: float | None, queries: int, metric: str, tolerance: float) -> str | None:
    """The note for a retention set too small to see a loss of `tolerance`: one standard error of the measured
    change (`se`, over `queries` queries) above half the tolerance. About (2 se / tolerance)^2 times as many
    queries would bring it there (the error falls as one over the square root of the count)."""
    if se is None or queries < 2 or 2 * se <= tolerance:
        return None
    needed = math.ceil(queries * (2 * se / tolerance) ** 2)
    return (f"{SMALL_RETENTION} for retention_tolerance {tolerance:g}: its {queries:,} queries measure the "
            f"change of {metric} to about ±{se:.3f} (one standard error), so a loss the size of the tolerance can "
            f"pass unseen; about {needed:,} retention pairs would measure it to ±{tolerance / 2:g} "
            "(docs/retention.md)")


def mix_with_base(run: RunState, splits: Splits, result: TrainResult, score: Score) -> EvaluationResult | None:
    """Mix the best weights (in the model) with the base's: the configured alpha, or the one auto WiSE-FT picks.
    Updates `result` (alpha, curve, 'after' on the selection set); returns the validation per query of the
    shipped weights when it differs from the best epoch's (None: the per_query.json written then still holds)."""
    cfg = run.cfg
    if auto_wanted(cfg, splits):
        return _auto(run, splits, result, score)
    model = unwrap(run.clip.model)
    model.load_state_dict(wise_ft(run.base_state, cpu_state(model), cfg.wise_ft_alpha))
    log.info("WiSE-FT: saved weights are %.2f x fine-tuned + %.2f x base", cfg.wise_ft_alpha, 1 - cfg.wise_ft_alpha)
    if not splits.validation:
        return None
    result.after_fine_tuned = result.after
    result.after = result.selection["after"] = score(run, splits.validation, cache=run.eval_cache)
    return run.evaluation


def _auto(run: RunState, splits: Splits, result: TrainResult, score: Score) -> EvaluationResult | None:
    """Score every alpha of GRID (alpha 0 and 1 from what the run already scored), ship the best (choose)."""
    cfg, metric, model = run.cfg, run.cfg.early_stopping_metric, unwrap(run.clip.model)
    if not result.improved:  # the best weights are the base's: every mix is the same model
        result.notes.append("auto WiSE-FT: no epoch beat the base model, so there was nothing to mix")
        return None
    started = time.perf_counter()
    fine = cpu_state(model)
    base_retention = run.progress.retention_before
    if splits.retention and run.retention_base is None:  # resumed: the base's per-query result is not saved
        model.load_state_dict(run.base_state)
        base_retention = run.progress.retention_before = score_retention(run, splits.retention, score, base=True)
        model.load_state_dict(fine)
    kept, se = _retention(run, splits.retention, score)
    points = [Point(0.0, run.progress.before, base_retention, retention_se=0.0 if splits.retention else None),
              Point(1.0, result.after, kept, retention_se=se)]
    for alpha in GRID[1:-1]:
        model.load_state_dict(wise_ft(run.base_state, fine, alpha))
        validation, evaluation = score(run, splits.validation, cache=run.eval_cache), run.evaluation
        kept, se = _retention(run, splits.retention, score)
        points.append(Point(alpha, validation, kept, evaluation, se))
    points.sort(key=lambda p: p.alpha)
    best = choose(points, metric, cfg.retention_tolerance)
    model.load_state_dict(wise_ft(run.base_state, fine, best.alpha))
    result.wise_ft_alpha, result.wise_ft_seconds = best.alpha, round(time.perf_counter() - started, 3)
    result.wise_ft_curve = [p.row(metric) for p in points]
    result.after_fine_tuned, result.after = result.after, best.validation
    result.selection["after"] = best.validation
    if splits.retention:
        result.retention = {"before": base_retention, "after": best.retention, "fine_tuned": points[-1].retention}
        _resolution(run, result, best.retention_se, points[-1].retention_se)
    log.info("auto WiSE-FT: alpha %g of %s on %s (%s); %d mixes scored in %.1f s", best.alpha,
             ", ".join(f"{p.alpha:g}" for p in points), metric,
             f"retention within {cfg.retention_tolerance:g} of the base" if splits.retention else "no retention set",
             len(GRID) - 2, result.wise_ft_seconds)
    if best.alpha == 0:  # the base model: its validation per query again (its embeddings may be stored)
        with run.eval_cache.storing() if run.eval_cache is not None else nullcontext():
            score(run, splits.validation, cache=run.eval_cache)
        return run.evaluation
    return best.evaluation  # None at alpha 1: the best epoch's per_query.json stays


def check_retention(run: RunState, splits: Splits, result: TrainResult, score: Score) -> None:
    """The retention set's metrics before and after (when the sweep did not measure them), or the note that
    there is none."""
    if not run.is_main:
        return
    if not splits.retention:
        result.notes.append(NO_RETENTION)
        log.info("%s", NO_RETENTION)
    elif not result.retention:
        after, se = _retention(run, splits.retention, score)
        result.retention = {"before": run.progress.retention_before, "after": after}
        _resolution(run, result, se, se)


def _resolution(run: RunState, result: TrainResult, shipped: float | None, widest: float | None) -> None:
    """Record the standard error of the shipped weights' retention change (`retention.change_se`), and note a
    retention set too small for the tolerance, judged on the widest change measured (plain fine-tuning's)."""
    metric = run.cfg.early_stopping_metric
    if shipped is not None:
        result.retention["change_se"] = {metric: round(shipped, 6)}
    base = run.retention_base
    queries = len(base.directions[direction_of(metric)].queries) if base is not None else 0
    if note := resolution_note(widest, queries, metric, run.cfg.retention_tolerance):
        result.notes.append(note)
        log.warning("%s", note)
