"""Evaluate a model: retrieval metrics on captioned pairs, and the WiSE-FT sweep (a fine-tuned model mixed with
its base at several weights)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import FinetuneConfig
from ..data.load import load_dataset
from ..data.pairs import CaptionPair

if TYPE_CHECKING:
    from ..model.clip import ClipModel
    from ..retrieval.evaluation_result import EvaluationResult

# the test split never chose anything (an epoch, a WiSE-FT alpha): its scores are the honest ones
PREFERRED_SUBSETS = ("test", "validation")


def read_subsets(data: str | Path, cfg: FinetuneConfig) -> dict[str, list[CaptionPair]]:
    """The captioned pairs of each subset of `data` (class folders captioned with cfg's first template)."""
    subsets, _ = load_dataset(data, label_template=cfg.label_templates[0],
                              column_names=(cfg.image_column, cfg.caption_column))
    return subsets


def default_subset(subsets: dict[str, list[CaptionPair]]) -> str:
    """The subset to score when none is named: test, else validation, else the first."""
    return next((s for s in PREFERRED_SUBSETS if s in subsets), next(iter(subsets)))


def score(clip: ClipModel, pairs: list[CaptionPair], cfg: FinetuneConfig, progress: bool = False
          ) -> dict[str, float]:
    """Retrieval metrics, both directions, of `clip` on `pairs`."""
    return score_per_query(clip, pairs, cfg, progress).metrics()


def score_in_galleries(clip: ClipModel, pairs: list[CaptionPair], cfg: FinetuneConfig) -> EvaluationResult:
    """score_per_query of a set held to a tolerance in metric points (a retention set), as training scores one:
    in galleries of at most evaluation_result.GALLERY images, each query ranked within its own, merged."""
    from ..retrieval.evaluation_result import galleries, merge

    return merge([score_per_query(clip, gallery, cfg) for gallery in galleries(pairs)])


def score_per_query(clip: ClipModel, pairs: list[CaptionPair], cfg: FinetuneConfig, progress: bool = False
                    ) -> EvaluationResult:
    """The evaluation of `clip` on `pairs` with each query's ranks and top candidates (its metrics(): score's)."""
    from ..retrieval.evaluate import evaluate_per_query

    return evaluate_per_query(clip, pairs, cfg.batch_size, cfg.num_workers, progress=progress,
                              templates=cfg.label_templates)


def wise_ft_sweep(clip: ClipModel, base_dir: str | None, alphas: list[float], pairs: list[CaptionPair],
                  cfg: FinetuneConfig, save_mix_to: str | Path | None = None) -> dict[float, dict[str, float]]:
    """The metrics of each mix alpha x `clip` + (1 - alpha) x its base (the base from `base_dir`, else the one
    its finetune_config.json names); with `save_mix_to`, the first alpha's mix is saved there."""
    from ..retrieval.evaluate import base_model_of, save_wise_ft_mix
    from ..retrieval.evaluate import wise_ft_sweep as sweep

    base = base_model_of(clip, base_dir, cfg.device)
    results = sweep(clip, base, alphas, pairs, cfg.batch_size, cfg.num_workers, cfg.label_templates)
    if save_mix_to is not None:
        save_wise_ft_mix(clip, base, alphas[0], save_mix_to, results[alphas[0]])
    return results
