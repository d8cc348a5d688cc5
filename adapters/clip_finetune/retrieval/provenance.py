"""Who made an embeddings file: the model (its name, and a hash of its config and weights) and the modality. An
index embedded by another model of the same dimension, or of texts, would rank without a word: search checks it.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import DataError
from ..model.clip import ClipModel
from .index import Index
from .shards import model_sha256
from .store import Embeddings

log = logging.getLogger(__name__)

ALLOW_HINT = "--allow-mismatch searches it anyway"


def made_by(clip: ClipModel, kind: str) -> dict[str, Any]:
    """What an embeddings file records of its maker: kind ('images' or 'texts'), model name, model_sha256."""
    return {"kind": kind, "model": clip.source, "model_sha256": model_sha256(clip)}


def check_index(index: Embeddings | Index, source: str, clip: ClipModel, kind: str = "images",
                allow: bool = False) -> None:
    """Refuse to search `index` (read from `source`) with `clip` when it holds other vectors than `kind` or was
    embedded by a model with other weights; with `allow`, or when the file records no maker, only log it."""
    width = index.vectors.shape[1] if isinstance(index, Embeddings) else index.dim
    if width != clip.embed_dim:
        raise DataError(f"the index {source!r} holds {width}-d vectors but the model embeds "
                        f"{clip.embed_dim}-d; embed the items again with this model")
    meta = index.meta
    if not meta:
        log.warning("%s records no model: it cannot be checked that this model embedded it", source)
        return
    problems = []
    if meta.get("kind") != kind:
        problems.append(f"it holds {meta.get('kind')} vectors, and queries are compared with {kind}")
    if meta.get("model_sha256") != model_sha256(clip):
        problems.append(f"it was embedded by {meta.get('model')!r}, a model with other weights than {clip.source!r}")
    if not problems:
        return
    message = f"the index {source!r} does not fit this search: {'; '.join(problems)}"
    if allow:
        log.warning("%s (searching anyway: --allow-mismatch)", message)
        return
    raise DataError(f"{message}. Embed the {kind} again with this model (clip-finetune embed --{kind} ...), or "
                    f"{ALLOW_HINT}")
