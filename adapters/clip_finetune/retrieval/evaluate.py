"""Retrieval evaluation of a model on caption pairs, both directions (formulas in metrics.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DEFAULT_LABEL_TEMPLATES, EVAL_KS, build_config
from ..data.identity import content_key, normalise_caption
from ..data.pairs import CaptionPair, has_item_id
from ..errors import DataError, ModelError, Setting
from ..inputs import MAX_JSON_BYTES, Unreadable, read_json
from ..model.clip import METRICS_NAME, ClipModel, load_artifact, load_model, save_artifact
from ..model.weights import cpu_state, wise_ft
from .embed import encode_images, encode_texts
from .eval_cache import EvalCache
from .evaluation_result import TOP_K, EvaluationResult, rank_pairs
from .zero_shot import class_vectors, labelled_classes, zero_shot_metrics

log = logging.getLogger(__name__)

# Retrieval metrics score every caption against every image: the [captions, images] scores and relevance, and their
# image->text copies, about 10 bytes a cell; 4e8 cells (20,000 x 20,000) is ~4 GB. Past it an evaluation set is
# refused before any embedding.
MAX_EVAL_CELLS = 400_000_000
MAX_ZERO_SHOT_CLASSES = 10_000  # zero-shot embeds every class x template; past this it is skipped, with a warning


@dataclass
class PairEmbeddings:
    """Embeddings of an evaluation set: each distinct image once (by file content), each distinct caption once
    (normalised), and which captions are relevant to which images (duplicate-aware, docs/metrics.md)."""

    images: list[str]  # one path per distinct image content, in order of first appearance
    image_features: np.ndarray  # [n_images, d]
    captions: list[str]  # the first spelling of each distinct normalised caption
    text_features: np.ndarray  # [n_texts, d]
    text_to_image: np.ndarray  # [n_texts] the first image each caption was given to
    relevant: np.ndarray  # [n_links, 2] (text, image): the caption was given to an image of that content
    image_labels: list[tuple[str, ...]]  # [n_images] the class labels of each image (zero-shot), maybe none
    # what de-duplication merged: every path and item id of each image, the item ids of each caption's pairs
    image_paths: list[tuple[str, ...]] = field(default_factory=list)
    image_items: list[tuple[str, ...]] = field(default_factory=list)
    caption_items: list[tuple[str, ...]] = field(default_factory=list)

    def image_ids(self) -> list[str]:
        """One id per image as the data names it: the item id of its first pair when there is one (and no other
        image took it), else its first path (evaluation_result's docstring)."""
        ids: list[str] = []
        taken: set[str] = set()
        for i, path in enumerate(self.images):
            items = self.image_items[i] if i < len(self.image_items) else ()
            ident = items[0] if items and items[0] not in taken else path
            taken.add(ident)
            ids.append(ident)
        return ids

    def id_tables(self) -> tuple[dict[str, dict[str, list[str]]], dict[str, dict[str, list[str]]]]:
        """({image id: {"paths", "items"}}, {caption: {"items"}}): what each evaluated id stands for."""
        paths = self.image_paths or [(p,) for p in self.images]
        images = {ident: {"paths": list(paths[i]), "items": list(self.image_items[i] if self.image_items else ())}
                  for i, ident in enumerate(self.image_ids())}
        captions = {c: {"items": list(self.caption_items[t] if self.caption_items else ())}
                    for t, c in enumerate(self.captions)}
        return images, captions

    def relevance(self) -> np.ndarray:
        """[n_texts, n_images] bool: a caption is relevant to every image it was given to, so images sharing a
        caption are all relevant to it, and an image to every caption any copy of it was given."""
        out = np.zeros((len(self.captions), len(self.images)), dtype=bool)
        out[self.relevant[:, 0], self.relevant[:, 1]] = True
        return out


def embed_pairs(
    clip: ClipModel, pairs: Sequence[CaptionPair], batch_size: int = 64, num_workers: int | None = None,
    progress: bool = True,
    cache: EvalCache | None = None,
) -> PairEmbeddings:
    """Embed the distinct images (by content: one photo under two paths is one image) and the distinct
    captions (normalised) of `pairs`. `cache`: a training run's EvalCache (the same embeddings, reused where
    nothing changed)."""
    content = {p.image: content_key(p.image) for p in pairs}
    first_path = {}
    for p in pairs:
        first_path.setdefault(content[p.image], p.image)
    if cache is not None:
        vectors, kept = cache.images(clip, list(first_path.values()), batch_size, num_workers)
    else:
        vectors, kept = encode_images(clip, list(first_path.values()), batch_size, num_workers, progress=progress,
                                      desc="evaluate: embed images")
    # images that failed to decode are dropped, and the captions that describe them with them
    all_keys = list(first_path)
    keys = [all_keys[i] for i in kept]
    image_index = {key: i for i, key in enumerate(keys)}
    usable = [p for p in pairs if content[p.image] in image_index]
    if not usable:
        raise DataError(f"none of the {len(pairs)} evaluation pairs has a decodable image")
    text_index: dict[str, int] = {}
    captions, links, labels = [], {}, [set() for _ in keys]
    # dicts as ordered sets: every path and item id of each image, the item ids of each caption
    paths: list[dict[str, None]] = [{} for _ in keys]
    image_items: list[dict[str, None]] = [{} for _ in keys]
    caption_items: list[dict[str, None]] = []
    for p in usable:
        t = text_index.setdefault(normalise_caption(p.caption), len(text_index))
        if t == len(captions):
            captions.append(p.caption)
            caption_items.append({})
        i = image_index[content[p.image]]
        links.setdefault((t, i), None)
        paths[i].setdefault(p.image, None)
        if has_item_id(p):  # the ids de-duplication merges survive it
            image_items[i].setdefault(p.item_id, None)
            caption_items[t].setdefault(p.item_id, None)
        if p.label:
            labels[i].add(p.label)
    if cache is not None:
        text_features = cache.texts(clip, captions, max(batch_size, 256))
    else:
        text_features = encode_texts(clip, captions, batch_size=max(batch_size, 256), progress=progress,
                                     desc="evaluate: embed captions")
    relevant = np.array(list(links), dtype=np.int64).reshape(-1, 2)
    text_to_image = np.full(len(captions), -1, dtype=np.int64)
    for t, i in reversed(relevant.tolist()):  # the first link of each text wins
        text_to_image[t] = i
    return PairEmbeddings([first_path[k] for k in keys], vectors, captions, text_features, text_to_image, relevant,
                          [tuple(sorted(s)) for s in labels], [tuple(d) for d in paths],
                          [tuple(d) for d in image_items], [tuple(d) for d in caption_items])


def evaluate(
    clip: ClipModel,
    pairs: Sequence[CaptionPair],
    batch_size: int = 64,
    num_workers: int | None = None,
    ks: Sequence[int] = EVAL_KS,
    progress: bool = True,
    templates: Sequence[str] = DEFAULT_LABEL_TEMPLATES,
    cache: EvalCache | None = None,
    on_result: Callable[[EvaluationResult], None] | None = None,
) -> dict[str, float]:
    """Text->image and image->text retrieval metrics of `clip` on `pairs` (flat 'direction/metric' keys), with
    duplicates sharing relevance; with two or more class labels among the images, also zero-shot classification
    accuracy ('zero_shot/...', each class the mean of its `templates`). `cache`: see embed_pairs. The metrics of
    evaluate_per_query's result, which `on_result` is given (training keeps it for per_query.json)."""
    result = evaluate_per_query(clip, pairs, batch_size, num_workers, ks, progress, templates, cache)
    if on_result is not None:
        on_result(result)
    return result.metrics()


def evaluate_per_query(
    clip: ClipModel,
    pairs: Sequence[CaptionPair],
    batch_size: int = 64,
    num_workers: int | None = None,
    ks: Sequence[int] = EVAL_KS,
    progress: bool = True,
    templates: Sequence[str] = DEFAULT_LABEL_TEMPLATES,
    cache: EvalCache | None = None,
    top: int = TOP_K,
) -> EvaluationResult:
    """evaluate() with each query's detail: the ranks of its relevant candidates and its `top` best candidates,
    by the data's own ids (evaluation_result.py). A set too large to score every caption against every image is
    refused before any embedding (check_evaluation_size)."""
    check_evaluation_size(pairs)
    emb = embed_pairs(clip, pairs, batch_size, num_workers, progress, cache)
    images, captions = emb.id_tables()
    directions = rank_pairs(emb.image_features, emb.text_features, emb.relevance(), list(images), emb.captions, top)
    result = EvaluationResult(directions, images, captions, tuple(ks))
    classes = labelled_classes(emb.image_labels)
    if len(classes) > MAX_ZERO_SHOT_CLASSES:
        log.warning("zero-shot accuracy skipped: %d classes is more than %d (each class is embedded with every label "
                    "template)", len(classes), MAX_ZERO_SHOT_CLASSES)
    elif len(classes) >= 2:
        vectors = class_vectors(clip, classes, templates, max(batch_size, 256))
        result.zero_shot = zero_shot_metrics(emb.image_features, emb.image_labels, classes, vectors)
    return result


def check_evaluation_size(pairs: Sequence[CaptionPair]) -> None:
    """DataError when the evaluation set is too large to score every caption against every image (distinct paths
    and captions bound the distinct images and captions: checked before any embedding)."""
    images, captions = len({p.image for p in pairs}), len({p.caption for p in pairs})
    if images * captions > MAX_EVAL_CELLS:
        raise DataError(f"the evaluation set of {len(pairs):,} pairs ({captions:,} captions x {images:,} images) is "
                        f"too large: retrieval metrics score every caption against every image ({images * captions:,} "
                        f"scores, about {images * captions * 10 / 2**30:,.0f} GB); at most {MAX_EVAL_CELLS:,} are "
                        "supported. Evaluate on a sample: a smaller validation or test subset, or holdout_max_pairs")


def wise_ft_sweep(
    fine_tuned: ClipModel,
    base: ClipModel,
    alphas: Sequence[float],
    pairs: Sequence[CaptionPair],
    batch_size: int = 64,
    num_workers: int | None = None,
    templates: Sequence[str] = DEFAULT_LABEL_TEMPLATES,
) -> dict[float, dict[str, float]]:
    """Retrieval metrics of the WiSE-FT mix `alpha * fine_tuned + (1 - alpha) * base` for each alpha.

    The mixes are built in `fine_tuned.model`, whose own weights are put back at the end.
    """
    own, base_state = cpu_state(fine_tuned.model), cpu_state(base.model)
    results = {}
    try:
        for alpha in alphas:
            fine_tuned.model.load_state_dict(wise_ft(base_state, own, alpha))
            results[alpha] = evaluate(fine_tuned, pairs, batch_size, num_workers, templates=templates)
    finally:
        fine_tuned.model.load_state_dict(own)
    return results


def base_model_of(fine_tuned: ClipModel, base_dir: str | None = None, device: str | None = None) -> ClipModel:
    """The model a fine-tuned model started from: `base_dir`, else the base its finetune_config.json names."""
    if base_dir:
        return load_artifact(base_dir, device)
    saved = fine_tuned.extra.get("finetune_config")
    if not saved:
        raise ModelError(f"{fine_tuned.source} has no finetune_config.json naming its base; give {{base}}",
                         advice={"base": Setting("base", "DIR")})
    alpha = _shipped_alpha(Path(fine_tuned.source), saved.get("wise_ft_alpha", 1.0))
    if isinstance(alpha, int | float) and alpha < 1:  # configured, or picked by auto WiSE-FT (metrics.json)
        log.warning("this model was saved as a WiSE-FT mix (alpha %s); the sweep mixes that with the base", alpha)
    base = build_config(saved)  # a random-init base: the same seed, the same weights
    return load_model(base.model, device, base.seed)


def _shipped_alpha(folder: Path, configured: float) -> float:
    """The WiSE-FT alpha a saved model's weights are: its metrics.json's (auto WiSE-FT picks it after training),
    else the configured one."""
    try:
        metrics = read_json(folder / METRICS_NAME, MAX_JSON_BYTES) if (folder / METRICS_NAME).is_file() else {}
    except Unreadable:
        return configured
    alpha = metrics.get("wise_ft_alpha") if isinstance(metrics, dict) else None
    return float(alpha) if isinstance(alpha, int | float) and not isinstance(alpha, bool) else configured


def save_wise_ft_mix(
    fine_tuned: ClipModel, base: ClipModel, alpha: float, out: str | Path, metrics: dict[str, float]
) -> Path:
    """Save the WiSE-FT mix `alpha * fine_tuned + (1 - alpha) * base` as a model folder."""
    mixed = wise_ft(cpu_state(base.model), cpu_state(fine_tuned.model), alpha)
    saved = fine_tuned.extra.get("finetune_config")
    cfg = build_config(saved, {"wise_ft_alpha": alpha}) if saved else None
    return save_artifact(fine_tuned, out, cfg, {"wise_ft_alpha": alpha, "after": metrics}, state_dict=mixed)
