"""The tokenizer of a ClipModel: made when first used (ClipModel.tokenizer), and built once per process for
each setting of open_clip's BPE tokenizer (shared_tokenizer)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
from open_clip.tokenizer import SimpleTokenizer

from ..inputs import MAX_CONFIG_BYTES, Unreadable, read_json

# open_clip.get_tokenizer builds a new SimpleTokenizer on every call: its BPE tables (49,408 merges read from a
# gzip file into three dicts) take ~0.1-0.3 s each time (profiled), paid by every model loaded in a process (the
# gate loads two, a test run hundreds). The tables depend only on the settings below; the tokenizer is not
# changed by use (its word cache only fills), so one built tokenizer serves every model that shares them.
_BUILT: dict[tuple[str, str], SimpleTokenizer] = {}
_LOCK = threading.Lock()


def shared_tokenizer(spec: str) -> Callable:
    """open_clip.get_tokenizer(spec), the same object again for a spec whose BPE tokenizer settings were built
    before in this process. HF and SigLIP tokenizers (read from files or a hub) and hub specs are built each time.
    """
    key = _bpe_key(spec)
    if key is None:
        return open_clip.get_tokenizer(spec)
    with _LOCK:
        if key not in _BUILT:
            tokenizer = open_clip.get_tokenizer(spec)
            if type(tokenizer) is not SimpleTokenizer:
                return tokenizer
            _BUILT[key] = tokenizer
        return _BUILT[key]


def _bpe_key(spec: str) -> tuple[str, str] | None:
    """What open_clip.get_tokenizer(spec) builds a SimpleTokenizer from: the text config's context length and
    tokenizer kwargs (for a built-in name also the name: get_tokenizer picks SigLIP's tokenizer by name); None
    where it may build another tokenizer or the config cannot be read here (get_tokenizer then says why)."""
    if spec.startswith("local-dir:"):
        try:  # bounded, as every read of a saved model's config
            config = read_json(Path(spec[len("local-dir:"):]) / "open_clip_config.json", MAX_CONFIG_BYTES)
            text_cfg = config["model_cfg"].get("text_cfg", {})
        except (Unreadable, KeyError, TypeError, AttributeError):
            return None
        name = "local-dir"
    elif ":" in spec:  # hf-hub: and other schemas
        return None
    else:
        config = open_clip.get_model_config(spec)
        if config is None:
            return None
        text_cfg, name = config.get("text_cfg", {}), spec
    if not isinstance(text_cfg, dict) or text_cfg.get("hf_tokenizer_name") or "siglip" in name.lower():
        return None
    settings = {"context_length": text_cfg.get("context_length"), "kwargs": text_cfg.get("tokenizer_kwargs", {})}
    return name, json.dumps(settings, sort_keys=True, default=repr)


@dataclass(frozen=True)
class TokenizerLater:
    """shared_tokenizer(spec), made when first used: a process that only embeds images never needs it."""

    spec: str


class LazyTokenizer:
    """ClipModel.tokenizer: what was given, a TokenizerLater made into the tokenizer at the first read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: Any, objtype: type | None = None) -> Callable:
        if obj is None:
            raise AttributeError("tokenizer")  # a required field, without a default
        tokenizer = obj.__dict__[self.slot]
        if isinstance(tokenizer, TokenizerLater):
            tokenizer = obj.__dict__[self.slot] = shared_tokenizer(tokenizer.spec)
        return tokenizer

    def __set__(self, obj: Any, tokenizer: Callable) -> None:
        obj.__dict__[self.slot] = tokenizer
