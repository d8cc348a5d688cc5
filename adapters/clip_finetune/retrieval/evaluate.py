"""Retrieval evaluation of a model on caption pairs, both directions (formulas in metrics.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import EVAL_KS, build_config
from ..data.pairs import CaptionPair
from ..errors import DataError, ModelError
from ..model.clip import ClipModel, load_artifact, load_model, save_artifact
from ..model.weights import cpu_state, wise_ft
from .embed import encode_images, encode_texts
from .eval_cache import EvalCache
from .metrics import retrieval_metrics

log = logging.getLogger(__name__)


@dataclass
class PairEmbeddings:
    """Embeddings of an evaluation set: each distinct image once, each caption once."""

    images: list[str]  # distinct image paths, in order of first appearance
    image_features: np.ndarray  # [n_images, d]
    captions: list[str]
    text_features: np.ndarray  # [n_texts, d]
    text_to_image: np.ndarray  # [n_texts] index into images of the image each caption describes


def embed_pairs(
    clip: ClipModel, pairs: Sequence[CaptionPair], batch_size: int = 64, num_workers: int | None = None,
    cache: EvalCache | None = None,
) -> PairEmbeddings:
    """Embed the distinct images and the captions of `pairs` (several captions of one image share it).
    `cache`: a training run's EvalCache (the same embeddings, reused where nothing changed)."""
    images = list(dict.fromkeys(p.image for p in pairs))
    if cache is not None:
        vectors, kept = cache.images(clip, images, batch_size, num_workers)
    else:
        vectors, kept = encode_images(clip, images, batch_size, num_workers, progress=False)
    # images that failed to decode are dropped, and the captions that describe them with them
    images = [images[i] for i in kept]
    index = {path: i for i, path in enumerate(images)}
    usable = [p for p in pairs if p.image in index]
    if not usable:
        raise DataError(f"none of the {len(pairs)} evaluation pairs has a decodable image")
    captions = [p.caption for p in usable]
    text_batch = max(batch_size, 256)
    if cache is not None:
        text_features = cache.texts(clip, captions, text_batch)
    else:
        text_features = encode_texts(clip, captions, batch_size=text_batch)
    text_to_image = np.array([index[p.image] for p in usable], dtype=np.int64)
    return PairEmbeddings(images, vectors, captions, text_features, text_to_image)


def evaluate(
    clip: ClipModel,
    pairs: Sequence[CaptionPair],
    batch_size: int = 64,
    num_workers: int | None = None,
    ks: Sequence[int] = EVAL_KS,
    cache: EvalCache | None = None,
) -> dict[str, float]:
    """Text->image and image->text retrieval metrics of `clip` on `pairs` (flat 'direction/metric' keys);
    `cache`: see embed_pairs."""
    emb = embed_pairs(clip, pairs, batch_size, num_workers, cache)
    return retrieval_metrics(emb.image_features, emb.text_features, emb.text_to_image, ks)


def wise_ft_sweep(
    fine_tuned: ClipModel,
    base: ClipModel,
    alphas: Sequence[float],
    pairs: Sequence[CaptionPair],
    batch_size: int = 64,
    num_workers: int | None = None,
) -> dict[float, dict[str, float]]:
    """Retrieval metrics of the WiSE-FT mix `alpha * fine_tuned + (1 - alpha) * base` for each alpha.

    The mixes are built in `fine_tuned.model`, whose own weights are put back at the end.
    """
    own, base_state = cpu_state(fine_tuned.model), cpu_state(base.model)
    results = {}
    try:
        for alpha in alphas:
            fine_tuned.model.load_state_dict(wise_ft(base_state, own, alpha))
            results[alpha] = evaluate(fine_tuned, pairs, batch_size, num_workers)
    finally:
        fine_tuned.model.load_state_dict(own)
    return results


def base_model_of(fine_tuned: ClipModel, base_dir: str | None = None, device: str | None = None) -> ClipModel:
    """The model a fine-tuned model started from: `base_dir`, else the base its finetune_config.json names."""
    if base_dir:
        return load_artifact(base_dir, device)
    saved = fine_tuned.extra.get("finetune_config")
    if not saved:
        raise ModelError(f"{fine_tuned.source} has no finetune_config.json naming its base; give --base DIR")
    if saved.get("wise_ft_alpha", 1.0) < 1:
        log.warning("this model was saved as a WiSE-FT mix (alpha %s); the sweep mixes that with the base",
                    saved["wise_ft_alpha"])
    return load_model(build_config(saved, {"device": device}))  # a random-init base: the same seed, the same weights


def save_wise_ft_mix(
    fine_tuned: ClipModel, base: ClipModel, alpha: float, out: str | Path, metrics: dict[str, float]
) -> Path:
    """Save the WiSE-FT mix `alpha * fine_tuned + (1 - alpha) * base` as a model folder."""
    mixed = wise_ft(cpu_state(base.model), cpu_state(fine_tuned.model), alpha)
    saved = fine_tuned.extra.get("finetune_config")
    cfg = build_config(saved, {"wise_ft_alpha": alpha}) if saved else None
    return save_artifact(fine_tuned, out, cfg, {"wise_ft_alpha": alpha, "after": metrics}, state_dict=mixed)
