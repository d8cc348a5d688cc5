"""get_model() loads one tower of a saved model; encode() embeds texts or images with it through the same
pipeline as `clip-finetune embed` and the Dataloop adapter (retrieval/embed.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError, at_boundary
from .run import Run

if TYPE_CHECKING:
    from ..model.clip import ClipModel

TOWERS = ("clip-text", "clip-vision")


@dataclass
class Encoder:
    """One tower of a saved model, ready for encode()."""

    clip: ClipModel
    tower: Literal["clip-text", "clip-vision"]

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim


@at_boundary
def get_model(
    artifact: str | os.PathLike | Run, select_model: Literal["clip-text", "clip-vision"], device: str | None = None
) -> Encoder:
    """Load the text or the vision tower of a saved model folder (or of a finished Run)."""
    if select_model not in TOWERS:
        raise ConfigError(f"select_model: {select_model!r} is not a tower; use 'clip-text' (texts) or "
                          "'clip-vision' (images)")
    if not isinstance(artifact, (str, os.PathLike, Run)) or not os.fspath(
            artifact.path if isinstance(artifact, Run) else artifact).strip():
        raise ConfigError(f"artifact: expected a saved model folder or a finished Run (got {artifact!r:.80})")
    from ..model.clip import load_artifact

    folder = artifact.model_dir if isinstance(artifact, Run) else artifact
    return Encoder(load_artifact(folder, device), select_model)


@at_boundary
def encode(model: Encoder, data: Sequence[Any] | str | Image.Image, batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 vectors [n, d], one row per text (clip-text) or image (path or PIL; clip-vision),
    in order. An image that cannot be decoded is an error (a skipped row would misalign the result)."""
    from ..retrieval.embed import encode_images, encode_texts

    if not isinstance(model, Encoder):
        raise ConfigError(f"encode: model must be what get_model(...) returns (got {type(model).__name__})")
    # bool is an int, but batch_size=True is a slip, not a batch of one
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"encode: batch_size must be a whole number of at least 1 (got {batch_size!r:.80})")
    if not isinstance(data, (str, os.PathLike, Image.Image, Sequence)) or isinstance(data, (bytes, bytearray)):
        raise DataError(f"encode: data must be a text, an image (path or PIL) or a list of them "
                        f"(got {type(data).__name__})")
    items = [data] if isinstance(data, (str, os.PathLike, Image.Image)) else list(data)
    if model.tower == "clip-text":
        if not all(isinstance(t, str) for t in items):
            raise DataError("encode: a clip-text model encodes strings; use get_model(..., 'clip-vision') "
                            "for images")
        return encode_texts(model.clip, items, batch_size)
    odd = next((x for x in items if not isinstance(x, (str, os.PathLike, Image.Image))), None)
    if odd is not None:
        raise DataError(f"encode: a clip-vision model encodes image paths or PIL images (got {odd!r:.80})")
    sources = [x if isinstance(x, Image.Image) else os.fspath(x) for x in items]
    vectors, kept = encode_images(model.clip, sources, batch_size, progress=False)
    if len(kept) < len(sources):
        bad = sorted(set(range(len(sources))) - set(kept))
        example = sources[bad[0]] if isinstance(sources[bad[0]], str) else f"image #{bad[0]}"
        raise DataError(f"encode: {len(bad)} of {len(sources)} images could not be decoded (e.g. {example!r}); "
                        "the log names each reason; remove or re-export them")
    return vectors
