"""Model metrics for the platform's charts: loss, learning rate and validation retrieval per epoch, and
recall@k / MRR of an evaluation."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import dtlpy as dl

from adapters.clip_finetune.config import DIRECTIONS, EVAL_KS

from .platform import PLATFORM_ERRORS

logger = logging.getLogger(__name__)

PUBLISHED_METRICS = ("recall@1", "recall@5", "recall@10", "mrr")


def publish(model: dl.Model, samples: list[dl.PlotSample], dataset_id: str | None = None) -> None:
    """Publish metric samples; a failure is logged, not raised (a chart is not worth a run)."""
    if not samples:
        return
    try:
        if model.metrics.create(samples=samples, dataset_id=dataset_id or model.dataset_id) is False:
            logger.warning("the platform did not accept %d metric samples", len(samples))
    except PLATFORM_ERRORS as e:
        logger.warning("could not publish %d metric samples: %s", len(samples), e)


def plot_samples(epoch: int, record: Mapping[str, float]) -> list[dl.PlotSample]:
    """Loss, learning rate and validation retrieval metrics of one epoch (epoch 0: the base model)."""
    samples = []
    if "train_loss" in record:
        samples.append(dl.PlotSample(figure="loss", legend="train", x=epoch, y=record["train_loss"]))
    if "lr" in record:
        samples.append(dl.PlotSample(figure="learning rate", legend="lr", x=epoch, y=record["lr"]))
    for direction in DIRECTIONS:
        for metric in PUBLISHED_METRICS:
            if f"{direction}/{metric}" in record:
                value = record[f"{direction}/{metric}"]
                samples.append(dl.PlotSample(figure=f"validation {direction}", legend=metric, x=epoch, y=value))
    return [s for s in samples if math.isfinite(s.y)]  # NaN is not JSON


def evaluation_samples(metrics: Mapping[str, float], legend: str) -> list[dl.PlotSample]:
    """recall@k over k, and MRR, per direction; one line per evaluated dataset."""
    samples = []
    for direction in DIRECTIONS:
        for k in EVAL_KS:
            samples.append(dl.PlotSample(figure=f"evaluation {direction} recall@k", legend=legend, x=k,
                                         y=metrics[f"{direction}/recall@{k}"]))
        samples.append(dl.PlotSample(figure=f"evaluation {direction} mrr", legend=legend, x=0,
                                     y=metrics[f"{direction}/mrr"]))
    return [s for s in samples if math.isfinite(s.y)]
