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
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import PIL
import torch
from PIL import Image

from ..data.decode_cache import InputCache, transform_size
from ..data.identity import UNREADABLE, content_key
from ..errors import DataError
from ..model.clip import ClipModel
from ..model.weights import unwrap
from ..sections import RuntimeSection
from .embed import encode_images, encode_texts
from .safe_npz import load_npz
from .shards import model_sha256
from .store import write_npz

log = logging.getLogger(__name__)

CACHE_ENV = "CLIP_FINETUNE_CACHE"
STORE_FORMAT = 2  # bump when what a stored file holds, or how it is computed, changes
STORE_KEEP = 32  # stored evaluations kept (the least recently used beyond are deleted)
STORE_PREFIX = "base-eval-"  # the store's own files: the only ones it reads or prunes
STORE_MAX_BYTES = 1 << 30  # the read bound of a stored file when the caller does not say how many items it holds
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
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
        result = self.store.load(key, len(items), clip.embed_dim) if key is not None else None
        if result is None:
            result = compute()
            if key is not None:
                self.store.save(key, result)
        if state is not None:
            self._memo[tower] = (state, items, result)
        return result


class BaseEvalStore:
    """Embeddings of a base model on disk, one `base-eval-<key>.npz` per (weights, items, settings) content hash.

    A stored file is trusted only as far as it proves itself: it holds its key and a digest of its arrays (a file
    copied under another key, or changed, is a miss), it is read bounded by what the embeddings can need (a forged
    header or a compression bomb is a miss), and its shapes and kept indices must fit the items asked for. A miss
    is one warning and the embeddings computed afresh. Pruning deletes only this store's own files (the prefix):
    the cache folder is the user's, and may hold anything else."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._model_hash: str | None = None

    def forget_model(self) -> None:
        self._model_hash = None

    def path(self, key: str) -> Path:
        return self.folder / f"{STORE_PREFIX}{key}.npz"

    def key(self, clip: ClipModel, tower: str, items: list, batch_size: int) -> str | None:
        """The content hash of what this embedding depends on; None when an image is not a readable file."""
        digest = hashlib.blake2b(digest_size=20)
        if self._model_hash is None:
            self._model_hash = model_sha256(clip)
        settings = {"format": STORE_FORMAT, "tower": tower, "weights": self._model_hash, "model": clip.model_cfg,
                    "transform": repr(clip.preprocess), "preprocess": preprocess_settings(clip.preprocess),
                    "draft": transform_size(clip.preprocess), "max_image_pixels": Image.MAX_IMAGE_PIXELS,
                    "precision": clip.inference_precision, "device": clip.device.type, "batch_size": batch_size,
                    "torch": torch.__version__, "open_clip": open_clip.__version__, "pillow": PIL.__version__}
        digest.update(json.dumps(settings, sort_keys=True, default=_stable).encode())
        for item in items:  # images by content (the same files elsewhere give the same key), texts as text
            if tower == "image":
                item = content_key(item)  # already computed for evaluation (embed_pairs): cached, not re-read
                if item.startswith(UNREADABLE):
                    return None
            digest.update(item.encode() + b"\0")
        return digest.hexdigest()

    def load(self, key: str, n_items: int | None = None, width: int | None = None) -> Encoded | None:
        """The stored embeddings of `key` (of `n_items` items, `width` wide), or None: absent, or not proven."""
        path = self.path(key)
        if not os.path.lexists(path):
            return None
        bound = n_items * (width * 4 + 8) + (1 << 16) if n_items is not None and width else STORE_MAX_BYTES
        try:
            data = load_npz(path, ("vectors", "kept", "key", "digest"), max_bytes=bound)
            result = _proven(data, key, n_items, width)
            os.utime(path)  # recently used: kept by the pruning in save()
        except (DataError, OSError) as e:
            log.warning("ignored the stored base-model embeddings %s (%s); computing them afresh", path, e)
            return None
        log.info("read %d embeddings of the base model from %s (base_eval_cache)", len(result[0]), path)
        return result

    def save(self, key: str, result: Encoded) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            vectors, kept = np.ascontiguousarray(result[0]), np.asarray(result[1], np.int64)
            arrays = {"vectors": vectors, "kept": kept, "key": np.array(key), "digest": np.array(
                _digest(key, vectors, kept))}
            write_npz(self.path(key), arrays)
            self._prune()
        except OSError as e:  # a read-only or full disk costs the next run time, not this one its result
            log.warning("could not store the base model's embeddings in %s: %s", self.folder, e)

    def _prune(self) -> None:
        """Keep the STORE_KEEP most recently used of this store's own regular files; touch nothing else."""
        own = []
        for path in self.folder.glob(f"{STORE_PREFIX}*.npz"):
            with suppress(OSError):
                st = path.lstat()
                if stat.S_ISREG(st.st_mode):
                    own.append((st.st_mtime_ns, path))
        for _, old in sorted(own, reverse=True)[STORE_KEEP:]:
            old.unlink(missing_ok=True)


def _digest(key: str, vectors: np.ndarray, kept: np.ndarray) -> str:
    h = hashlib.blake2b(key.encode(), digest_size=20)
    h.update(f"{vectors.dtype.str}{vectors.shape}".encode())
    h.update(vectors.tobytes())
    h.update(kept.astype(np.int64).tobytes())
    return h.hexdigest()


def _proven(data: dict, key: str, n_items: int | None, width: int | None) -> Encoded:
    """The (vectors, kept) of a stored file that holds `key`, matches its digest and fits the items; DataError
    saying what does not."""
    vectors, kept = data["vectors"], data["kept"]
    if data["key"].shape != () or str(data["key"]) != key:
        raise DataError("it holds the embeddings of another key")
    if vectors.ndim != 2 or kept.ndim != 1 or len(kept) != len(vectors) or kept.dtype.kind not in "iu" \
            or vectors.dtype.kind != "f" or (width and vectors.shape[1] != width):
        raise DataError(f"arrays of shape {vectors.shape} and {kept.shape} are not embeddings with their indices")
    if len(kept) and (kept[0] < 0 or (n_items is not None and kept[-1] >= n_items) or np.any(np.diff(kept) <= 0)):
        raise DataError(f"its kept indices are not increasing indices of the {n_items} items")
    if data["digest"].shape != () or str(data["digest"]) != _digest(key, vectors, kept):
        raise DataError("its content does not match its digest (changed or damaged)")
    return vectors.astype(np.float32, copy=False), kept.tolist()


def preprocess_settings(preprocess: object) -> list:
    """Every step of an image transform with all its public settings: repr() leaves some out (open_clip's
    CenterCropOrPad shows its size, not its pad fill colour), and each changes the pixels."""
    steps = getattr(preprocess, "transforms", [preprocess])
    return [[type(t).__qualname__, {k: v for k, v in sorted(vars(t).items()) if not k.startswith("_")}]
            for t in steps]


def _stable(value: object) -> str:
    """JSON for what json cannot write: functions by name, anything else by a repr without memory addresses
    (a key must be the same in every process)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return _ADDRESS.sub("", repr(value))


def eval_cache_for(cfg: RuntimeSection, clip: ClipModel, n_images: int) -> tuple[EvalCache, float]:
    """The EvalCache of a run validating on `n_images` distinct images (the runtime section says the memory and
    whether the base model's embeddings are kept on disk), and what is left of cfg.image_cache_mb for the
    training images (the validation inputs take their share first)."""
    side = transform_size(clip.preprocess)
    need_mb = n_images * side * side * 3 / 2**20 if side else 0.0  # open_clip's eval crop: side x side, RGB
    eval_mb = min(float(cfg.image_cache_mb), need_mb)
    store = BaseEvalStore(cache_dir()) if cfg.base_eval_cache else None
    return EvalCache(InputCache(clip.preprocess, eval_mb, side), store), cfg.image_cache_mb - eval_mb
