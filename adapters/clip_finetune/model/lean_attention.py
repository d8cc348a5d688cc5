"""open_clip's self-attention without torch's layout copies.

open_clip's transformer blocks call `nn.MultiheadAttention(batch_first=True)` with the same tensor as query, key
and value. Outside its inference fast path torch then runs `F.multi_head_attention_forward`, which works in
[length, batch, width] layout: it transposes the input, makes the packed q/k/v projection contiguous again
(a copy of the whole projection), reshapes the heads, and copies the attention output back before the output
projection; the block then adds the transposed result to its residual. In a clip-tiny training step those
copies and their backward were ~8% of the step's CPU time (bench.step_profile, docs/performance.md).

LeanMultiheadAttention is the same module (the same parameters and state_dict; a saved model is what stock
open_clip loads) whose forward, for exactly that call, runs the packed projection on the batch-first input,
splits the heads with a view, calls the same `F.scaled_dot_product_attention` and applies the output
projection: the forward gives bit-identical outputs here and the gradients agree to float rounding
(tests/test_lean_attention.py). Any other call (cross-attention, a padding mask, attention weights asked for,
separate projection weights, bias_k/v, is_causal, a boolean or per-head mask) runs torch's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeanMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with a copy-free path for batch-first self-attention (see the module's doc)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._lean(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batch, length, width = query.shape
        heads = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None

    def _lean(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              key_padding_mask: torch.Tensor | None, need_weights: bool, attn_mask: torch.Tensor | None,
              is_causal: bool) -> bool:
        # a float [L, L] mask means the same to scaled_dot_product_attention as to torch's forward (a boolean
        # one is inverted there, a 3-d one is per head): only those reach the lean path
        mask_ok = attn_mask is None or (attn_mask.dim() == 2 and attn_mask.is_floating_point())
        return (query is key and key is value and query.dim() == 3 and self.batch_first and mask_ok
                and key_padding_mask is None and not need_weights and not is_causal
                and self._qkv_same_embed_dim and self.in_proj_weight is not None
                and self.bias_k is None and self.bias_v is None and not self.add_zero_attn)


def install(model: nn.Module) -> int:
    """Give every plain nn.MultiheadAttention in `model` the lean forward (a class change: parameters, buffers
    and state_dict stay as they are); subclasses keep theirs. Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = LeanMultiheadAttention
            changed += 1
    return changed


def uninstall(model: nn.Module) -> int:
    """Undo install: torch's own forward again (the stock open_clip model, e.g. as a benchmark's baseline)."""
    changed = 0
    for module in model.modules():
        if type(module) is LeanMultiheadAttention:
            module.__class__ = nn.MultiheadAttention
            changed += 1
    return changed
