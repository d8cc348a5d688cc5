"""Text tokens past a batch's last end-of-text token are not computed.

open_clip pads every caption to the context length (77 for the released models, 32 for clip-tiny) and runs the
text transformer over all of it, although a causal text tower that pools at the end-of-text token (CLIP's
`argmax` pooling: that token has the highest id) cannot be changed by anything after it: a position attends
only to itself and those before it, layer norms and MLPs act on each position alone. So the batch's tokens are
cut after its longest caption's end-of-text token, and the model runs with its positional embedding and causal
mask cut to the same length (`torch.func.functional_call`, so open_clip's own forward runs and the gradients
reach the full parameter). The features and gradients are the full-length ones to float rounding (the shorter
matrix products and attention round differently: ~1e-7, tests/test_text_trim.py); shop titles of 5-15 tokens
cut a 77-token context by 4-8x.

Only towers whose structure guarantees it are cut: open_clip's built-in CLIP text tower and its
TextTransformer with `argmax` pooling and an exactly causal mask, without an appended class token (CoCa) or a
padding mask. Anything else (HF text towers, SigLIP's `last` pooling, bidirectional masks), a wrapped model
(DDP, torch.compile: they call the module themselves) and a batch that fills the context runs as before.
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer
from torch.func import functional_call


def _text_parts(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(prefix of the names, module holding positional_embedding and attn_mask) of a text tower that may be cut,
    else None. Exact types: a subclass may encode text its own way, a wrapper calls the module itself."""
    if type(model) is CustomTextCLIP and type(model.text) is TextTransformer:
        text = model.text
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
            return None
        prefix, owner, pool = "text.", text, text.pool_type
    elif type(model) is CLIP:  # open_clip's built-in text tower
        prefix, owner, pool = "", model, getattr(model, "text_pool_type", None)
    else:
        return None
    if pool != "argmax" or not _is_causal(getattr(owner, "attn_mask", None)):
        return None
    positions = getattr(owner, "positional_embedding", None)
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2:
        return None
    return prefix, owner


def _is_causal(mask: Any) -> bool:
    """True for the additive causal mask open_clip builds: -inf above the diagonal, 0 on and below it."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    causal = torch.full(mask.shape, float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1)
    return bool(torch.equal(mask, causal))


def trim_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` [n, context] cut after the batch's last end-of-text token where `model`'s text tower allows it
    (a view of the same tensor); unchanged otherwise. Call it on CPU tokens (it reads their maximum)."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or _text_parts(model) is None:
        return tokens
    length = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :length] if length < tokens.shape[1] else tokens


def _overrides(model: torch.nn.Module, length: int) -> dict[str, torch.Tensor] | None:
    parts = _text_parts(model)
    if parts is None:
        return None
    prefix, owner = parts
    if length >= owner.positional_embedding.shape[0]:
        return None
    return {f"{prefix}positional_embedding": owner.positional_embedding[:length],
            f"{prefix}attn_mask": owner.attn_mask[:length, :length]}


def forward(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> Any:
    """`model(images, tokens)` for tokens cut by trim_tokens (or not cut: then exactly the plain call)."""
    over = _overrides(model, tokens.shape[-1]) if tokens.ndim == 2 else None
    if over is None:
        return model(images, tokens)
    return functional_call(model, over, (images, tokens), strict=False)


class _EncodeText(torch.nn.Module):
    """`model.encode_text` as a module's forward, so that functional_call can run it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` for tokens cut by trim_tokens (or not cut: then exactly the plain call)."""
    over = _overrides(model, tokens.shape[-1]) if tokens.ndim == 2 else None
    if over is None:
        return model.encode_text(tokens)
    return functional_call(_EncodeText(model), {f"model.{k}": v for k, v in over.items()}, (tokens,), strict=False)
