"""The configuration in sections (model, optimisation, data, selection, runtime): what each part of the engine
reads of a run's configuration. Users still write one flat JSON object (config.FinetuneConfig validates it and
holds the defaults and descriptions); `cfg.optimisation` and its siblings are these read-only views of it, so
an engine function that takes a section cannot reach the keys of another. Plain dataclasses: importing or
building a section imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar


@dataclass(frozen=True)
class ModelSection:
    """The model: which architecture and weights, in what precision, and what of it trains."""

    model_name: str
    pretrained: str | None
    embeddings_size: int | None
    precision: str
    compile: bool
    lock_image: bool
    lock_image_unlocked_groups: int
    lock_text: bool
    lock_text_unlocked_layers: int
    grad_checkpointing: bool
    export_onnx: bool


@dataclass(frozen=True)
class OptimisationSection:
    """How the weights move: batches, epochs, AdamW, the schedule, the loss, the step guards, WiSE-FT."""

    train_batch_size: int
    num_epochs: int
    max_steps: int | None
    learning_rate: float
    betas: tuple[float, float]
    epsilon: float
    weight_decay: float
    warmup: float
    lr_schedule: str
    grad_clip_norm: float | None
    accum_freq: int
    duplicate_aware_loss: bool
    unique_batches: bool
    hard_negatives: int
    wise_ft_alpha: float
    wise_ft_auto: bool
    max_bad_steps: int
    checkpoint_every_steps: int


@dataclass(frozen=True)
class DataSection:
    """How the data is read and split: the held-out part, train overlap, label captions, the pixel limit."""

    holdout_fraction: float
    holdout_max_pairs: int
    drop_train_overlap: bool
    leakage_picture_distance: int | None
    label_templates: tuple[str, ...]
    image_column: str | None
    caption_column: str | None
    max_image_pixels: int | None
    seed: int  # the held-out split is drawn under the run's seed


@dataclass(frozen=True)
class SelectionSection:
    """How the best epoch (and the auto WiSE-FT alpha) is picked and when a run stops early."""

    early_stopping: bool
    early_stopping_epochs: int
    early_stopping_metric: str
    retention_tolerance: float  # the retention set may fall this far below the base's


@dataclass(frozen=True)
class RuntimeSection:
    """Where and how the work runs: devices, processes, workers, batches of inference, caches, the seed."""

    batch_size: int
    seed: int
    num_workers: int | None
    device: str | None
    num_processes: int | None
    image_cache_mb: int
    tracking: str
    base_eval_cache: bool


SECTIONS = {"model": ModelSection, "optimisation": OptimisationSection, "data": DataSection,
            "selection": SelectionSection, "runtime": RuntimeSection}
S = TypeVar("S")


def section_of(cfg: Any, section: type[S]) -> S:
    """The `section` view of a flat configuration (lists become tuples: a section is immutable)."""
    values = {f.name: getattr(cfg, f.name) for f in fields(section)}  # type: ignore[arg-type]
    return section(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
