"""What the evaluations of one training run can reuse without changing a number (tests/test_eval_cache.py):

- the validation images, decoded and preprocessed once per run (data.decode_cache.InputCache);
- the features of a tower that does not train (lock_text / lock_image with no unlocked layers): computed once,
  reused while none of that tower's tensors has changed (torch bumps a tensor's version at every in-place
  write: optimizer steps, load_state_dict);
- the base model's embeddings, on disk across runs (BaseEvalStore), keyed by a content hash of the weights,
  the images, the captions and every setting that changes a bit of them.

Only what is embedded is cached; the metrics are always computed afresh from the embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from ..config import FinetuneConfig
from ..data.decode_cache import InputCache, transform_size
from ..data.identity import UNREADABLE, content_key
from ..files import atomic_write
from ..model.clip import ClipModel
from ..model.weights import unwrap
from .embed import encode_images, encode_texts
from .shards import model_sha256

log = logging.getLogger(__name__)

CACHE_ENV = "CLIP_FINETUNE_CACHE"
STORE_FORMAT = 1  # bump when what a stored file holds, or how it is computed, changes
STORE_KEEP = 32  # stored evaluations kept (the least recently used beyond are deleted)
Encoded = tuple[np.ndarray, list[int]]  # (vectors [n_ok, d], indices of the items embedded)


def cache_dir() -> Path:
    """$CLIP_FINETUNE_CACHE, else $XDG_CACHE_HOME/clip-finetune, else ~/.cache/clip-finetune."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clip-finetune"


def frozen_state(model: torch.nn.Module, tower: str) -> tuple[tuple[int, int], ...] | None:
    """(id, version) of every tensor of the image or text tower, or None when any of its parameters trains."""
    bare = unwrap(model)
    visual = {id(t) for t in (*bare.visual.parameters(), *bare.visual.buffers())}
    named = [*bare.named_parameters(), *bare.named_buffers()]
    if tower == "image":
        tensors = [t for _, t in named if id(t) in visual]
    else:  # everything else but the logit scale and bias: CLIP's text layers, or CustomTextCLIP's .text
        tensors = [t for n, t in named if id(t) not in visual and not n.startswith("logit_")]
    if any(t.requires_grad for t in tensors):
        return None
    return tuple((id(t), t._version) for t in tensors)


class EvalCache:
    """The reuse above for the evaluations of one run (retrieval.evaluate.embed_pairs takes it)."""

    def __init__(self, inputs: InputCache | None, store: BaseEvalStore | None) -> None:
        self.inputs = inputs
        self.store = store
        self._storing = False
        self._memo: dict[str, tuple[Any, list, Encoded]] = {}

    @contextmanager
    def storing(self) -> Iterator[None]:
        """Within it, embeddings are read from (or written to) the store: use it for the base model only."""
        self._storing = self.store is not None
        try:
            yield
        finally:
            self._storing = False
            if self.store is not None:
                self.store.forget_model()

    def images(self, clip: ClipModel, sources: Sequence[str], batch_size: int, num_workers: int | None
               ) -> Encoded:
        """encode_images(clip, sources), reused where nothing it depends on has changed."""
        def compute() -> Encoded:
            return encode_images(clip, sources, batch_size, num_workers, progress=False, inputs=self.inputs)

        return self._reuse(clip, "image", list(sources), batch_size, compute)

    def texts(self, clip: ClipModel, captions: Sequence[str], batch_size: int) -> np.ndarray:
        """encode_texts(clip, captions), reused where nothing it depends on has changed."""
        def compute() -> Encoded:
            return encode_texts(clip, captions, batch_size), list(range(len(captions)))

        return self._reuse(clip, "text", list(captions), batch_size, compute)[0]

    def _reuse(self, clip: ClipModel, tower: str, items: list, batch_size: int, compute: Callable[[], Encoded]
               ) -> Encoded:
        state = frozen_state(clip.model, tower)
        memo = self._memo.get(tower)
        if state is not None and memo is not None and memo[0] == state and memo[1] == items:
            return memo[2]
        key = self.store.key(clip, tower, items, batch_size) if self._storing else None
        result = self.store.load(key) if key is not None else None
        if result is None:
            result = compute()
            if key is not None:
                self.store.save(key, result)
        if state is not None:
            self._memo[tower] = (state, items, result)
        return result


class BaseEvalStore:
    """Embeddings of a base model on disk, one .npz per (weights, items, settings) content hash."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._model_hash: str | None = None

    def forget_model(self) -> None:
        self._model_hash = None

    def key(self, clip: ClipModel, tower: str, items: list, batch_size: int) -> str | None:
        """The content hash of what this embedding depends on; None when an image is not a readable file."""
        digest = hashlib.blake2b(digest_size=20)
        if self._model_hash is None:
            self._model_hash = model_sha256(clip)
        settings = {"format": STORE_FORMAT, "tower": tower, "weights": self._model_hash, "model": clip.model_cfg,
                    "transform": repr(clip.preprocess), "draft": transform_size(clip.preprocess),
                    "precision": clip.inference_precision, "device": clip.device.type,
                    "batch_size": batch_size, "torch": torch.__version__, "open_clip": open_clip.__version__}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for item in items:  # images by content (the same files elsewhere give the same key), texts as text
            if tower == "image":
                item = content_key(item)  # already computed for evaluation (embed_pairs): cached, not re-read
                if item.startswith(UNREADABLE):
                    return None
            digest.update(item.encode() + b"\0")
        return digest.hexdigest()

    def load(self, key: str) -> Encoded | None:
        path = self.folder / f"{key}.npz"
        try:
            with np.load(path) as data:
                result = data["vectors"].astype(np.float32, copy=False), data["kept"].tolist()
            os.utime(path)  # recently used: kept by the pruning in save()
        except (OSError, KeyError, ValueError):
            return None
        log.info("read %d embeddings of the base model from %s (base_eval_cache)", len(result[0]), path)
        return result

    def save(self, key: str, result: Encoded) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            vectors, kept = result
            atomic_write(self.folder / f"{key}.npz", lambda p: _write_npz(p, vectors, np.asarray(kept, np.int64)))
            stored = sorted(self.folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in stored[STORE_KEEP:]:
                old.unlink(missing_ok=True)
        except OSError as e:  # a read-only or full disk costs the next run time, not this one its result
            log.warning("could not store the base model's embeddings in %s: %s", self.folder, e)


def _write_npz(path: Path, vectors: np.ndarray, kept: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.savez given a path would add ".npz" to the temporary name
        np.savez(f, vectors=vectors, kept=kept)


def eval_cache_for(cfg: FinetuneConfig, clip: ClipModel, n_images: int) -> tuple[EvalCache, float]:
    """The EvalCache of a run validating on `n_images` distinct images, and what is left of
    cfg.image_cache_mb for the training images (the validation inputs take their share first)."""
    side = transform_size(clip.preprocess)
    need_mb = n_images * side * side * 3 / 2**20 if side else 0.0  # open_clip's eval crop: side x side, RGB
    eval_mb = min(float(cfg.image_cache_mb), need_mb)
    store = BaseEvalStore(cache_dir()) if cfg.base_eval_cache else None
    return EvalCache(InputCache(clip.preprocess, eval_mb, side), store), cfg.image_cache_mb - eval_mb
