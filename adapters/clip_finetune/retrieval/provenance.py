"""Who made an embeddings file: the model (its name, and a hash of its config and weights) and the modality. An
index embedded by another model of the same dimension, or of texts, would rank without a word: search checks it.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import DataError, Setting
from ..model.clip import ClipModel
from .index import Index
from .shards import model_sha256

log = logging.getLogger(__name__)

ALLOW = {"allow_mismatch": Setting("allow_mismatch", "True")}
ALLOW_HINT = "{allow_mismatch} searches it anyway"  # in a message with advice=ALLOW


def made_by(clip: ClipModel, kind: str) -> dict[str, Any]:
    """What an embeddings file records of its maker: kind ('images' or 'texts'), model name, model_sha256."""
    return {"kind": kind, "model": clip.source, "model_sha256": model_sha256(clip)}


def check_index(index: Index, source: str, clip: ClipModel, kind: str = "images", allow: bool = False) -> None:
    """Refuse to search `index` (any Index, or store.Embeddings; read from `source`) with `clip` when it holds other
    vectors than `kind` or was embedded by a model with other weights; with `allow`, or when the file records no
    maker, only log it."""
    if index.dim != clip.embed_dim:
        raise DataError(f"the index {source!r} holds {index.dim}-d vectors but the model embeds "
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
        log.warning("%s (searching anyway: allow_mismatch)", message)
        return
    embed = Setting("embed", kind, f"the embed use case, {kind}")
    raise DataError(f"{message}. Embed the {kind} again with this model ({{embed}}), or {ALLOW_HINT}",
                    advice={"embed": embed, **ALLOW})
