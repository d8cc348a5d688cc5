"""Zero-shot classification of labelled images, as CLIP does it: each class is the mean of its label's
template captions' embeddings (renormalised), each image is assigned the class it is most similar to.
Top-k accuracy is hit@k of ranking_metrics over the classes (the same pessimistic tie rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..model.clip import ClipModel
from .embed import encode_texts
from .metrics import ranking_metrics

ZERO_SHOT = "zero_shot"
ACCURACY_KS = (1, 5)


def class_vectors(clip: ClipModel, classes: Sequence[str], templates: Sequence[str], batch_size: int = 256
                  ) -> np.ndarray:
    """[n_classes, d] unit vectors: the mean of each class's template captions' embeddings, renormalised."""
    texts = [t.format(label=c) for c in classes for t in templates]
    vectors = encode_texts(clip, texts, batch_size).reshape(len(classes), len(templates), -1).mean(axis=1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def zero_shot_metrics(image_features: np.ndarray, image_labels: Sequence[Sequence[str]], classes: Sequence[str],
                      vectors: np.ndarray) -> dict[str, float]:
    """Top-1 (and top-5, with more than 5 classes) accuracy over the labelled images, and top-1 accuracy per
    class, as 'zero_shot/top1_accuracy', 'zero_shot/top5_accuracy', 'zero_shot/accuracy/<class>'. An image with
    several labels is right when any of them is predicted."""
    index = {c: i for i, c in enumerate(classes)}
    rows = [i for i, labels in enumerate(image_labels) if labels]
    relevance = np.zeros((len(rows), len(classes)), dtype=bool)
    for r, i in enumerate(rows):
        relevance[r, [index[c] for c in image_labels[i]]] = True
    scores = image_features[rows] @ vectors.T  # [n_labelled_images, n_classes]
    ks = tuple(k for k in ACCURACY_KS if k == 1 or k < len(classes))
    overall = ranking_metrics(scores, relevance, ks)
    out = {f"{ZERO_SHOT}/top{k}_accuracy": overall[f"hit@{k}"] for k in ks}
    for c, j in index.items():
        members = relevance[:, j]
        out[f"{ZERO_SHOT}/accuracy/{c}"] = ranking_metrics(scores[members], relevance[members], (1,))["hit@1"]
    return out


def labelled_classes(image_labels: Sequence[Sequence[str]]) -> list[str]:
    """The distinct labels of the images, sorted; zero-shot classification needs at least two."""
    return sorted({c for labels in image_labels for c in labels})
