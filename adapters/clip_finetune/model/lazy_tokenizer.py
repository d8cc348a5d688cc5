"""The tokenizer of a ClipModel, made when first used (ClipModel.tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import open_clip


@dataclass(frozen=True)
class TokenizerLater:
    """open_clip.get_tokenizer(spec), made when first used: building open_clip's BPE tokenizer takes ~0.3 s
    (profiled), which a process that only embeds images never needs."""

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
            tokenizer = obj.__dict__[self.slot] = open_clip.get_tokenizer(tokenizer.spec)
        return tokenizer

    def __set__(self, obj: Any, tokenizer: Callable) -> None:
        obj.__dict__[self.slot] = tokenizer
