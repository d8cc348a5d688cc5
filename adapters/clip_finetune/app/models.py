"""Open the model a use case works with: a saved model folder, else the configured (base) model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import FinetuneConfig

if TYPE_CHECKING:
    from ..model.clip import ClipModel


def open_model(cfg: FinetuneConfig, model_dir: str | Path | None = None) -> ClipModel:
    """The model saved in `model_dir` (on cfg's device and precision), else the one `cfg` configures."""
    from ..model.clip import load_artifact, load_model  # torch loads only when a model is opened

    if model_dir:
        return load_artifact(model_dir, cfg.device, cfg.precision)
    return load_model(cfg.model, cfg.device, cfg.seed)
