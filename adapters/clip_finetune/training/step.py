"""One optimisation step: forward under autocast, the contrastive loss (loss.py: open_clip's, duplicate-aware),
backward, clip, AdamW.

A non-finite loss or gradient norm skips the update and is counted (Progress.skip_step); the run stops after
`max_bad_steps` in a row (loop.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from ..model import text_trim
from ..model.precision import autocast_for
from ..model.weights import unwrap
from .distributed import all_reduce_min, mean_over_ranks
from .loss import Keys
from .state import RunState

MAX_LOGIT_SCALE = math.log(100)  # as in CLIP: the temperature may not go below 1/100
# (image_features, text_features, logit_scale, logit_bias, keys) -> loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, Keys | None], torch.Tensor]


def train_step(run: RunState, loss_fn: LossFn, batch: Any) -> float | None:
    """One step on `batch` ((images, tokens, indices) or None when none of it decoded); the loss, or None
    when the step was skipped.

    In a distributed run, all ranks take the same decisions: the batch is trimmed to the smallest rank's
    (after undecodable images), the loss is the mean over ranks.
    """
    device, ctx = run.clip.device, run.ctx
    images, tokens = (batch[0], batch[1]) if batch is not None else (None, None)
    n = len(images) if images is not None else 0
    if ctx is not None:  # every rank must feed the same number of pairs to the gathered loss
        n = all_reduce_min(n, device)
    k = min(run.opt.accum_freq, n)
    if n * run.world_size < 2 or k < 1:
        return None  # a contrastive step needs two pairs
    images = images[:n].to(device, non_blocking=True)
    # cut after the batch's last end-of-text token where the text tower cannot see past it (model/text_trim.py)
    tokens = text_trim.trim_tokens(run.train_model, tokens[:n]).to(device, non_blocking=True)
    keys = _batch_keys(run, batch[2][:n]) if run.keys is not None else None
    run.optimizer.zero_grad(set_to_none=True)
    backward = _whole_batch if k == 1 else _micro_batches
    value = backward(run, lambda *out: loss_fn(*out, keys), images, tokens, k)
    if value is None:
        return None
    return value if _apply(run) else None


def _batch_keys(run: RunState, indices: torch.Tensor) -> Keys:
    """(image ids, caption ids) of the batch's pairs, on the model's device."""
    idx = indices.numpy()
    image_ids, caption_ids = run.keys
    device = run.clip.device
    return torch.from_numpy(image_ids[idx]).to(device), torch.from_numpy(caption_ids[idx]).to(device)


def _bias(out: tuple) -> torch.Tensor | None:
    """The logit_bias of a forward's output (SigLIP models return it fourth), else None."""
    return out[3] if len(out) > 3 else None


def _whole_batch(run: RunState, loss_fn: Callable, images: torch.Tensor, tokens: torch.Tensor, k: int
                 ) -> float | None:
    with autocast_for(run.clip.device, run.precision):
        out = text_trim.forward(run.train_model, images, tokens)
        loss = loss_fn(out[0], out[1], out[2], _bias(out))
    value = _global_loss(run, loss.detach())
    if not math.isfinite(value):
        run.progress.skip_step()
        return None
    run.scaler.scale(loss).backward()
    return value


def _micro_batches(run: RunState, loss_fn: Callable, images: torch.Tensor, tokens: torch.Tensor, k: int
                   ) -> float | None:
    """`accum_freq` k > 1: the batch runs as k micro-batches with open_clip's feature caching.

    A no-grad pass computes every micro-batch's features, then each micro-batch is recomputed with gradients
    and its features put in place of the cached ones, so each backward is of the loss over the whole batch; the
    summed gradients are the whole batch's (the logit scale, which does not go through the features, takes its
    gradient from one of the k passes only).
    """
    model, device = run.train_model, run.clip.device
    image_chunks, token_chunks = images.chunk(k), tokens.chunk(k)
    k = len(image_chunks)  # chunk() makes fewer pieces when k does not divide a trimmed batch
    with torch.no_grad(), autocast_for(device, run.precision):
        cached = [text_trim.forward(model, i, t)[:2] for i, t in zip(image_chunks, token_chunks, strict=True)]
        cached_images, cached_texts = [c[0] for c in cached], [c[1] for c in cached]
        loss = loss_fn(torch.cat(cached_images), torch.cat(cached_texts), unwrap(model).logit_scale.exp(),
                       unwrap(model).logit_bias)
    value = _global_loss(run, loss)
    if not math.isfinite(value):
        run.progress.skip_step()
        return None
    for j in range(k):
        last = j == k - 1
        # DDP all-reduces gradients at the last micro-batch only
        sync = model.no_sync() if run.ctx is not None and not last else nullcontext()
        with sync:
            with autocast_for(device, run.precision):
                out = text_trim.forward(model, image_chunks[j], token_chunks[j])
                image_j, text_j, logit_scale, logit_bias = out[0], out[1], out[2], _bias(out)
                all_images = torch.cat([*cached_images[:j], image_j, *cached_images[j + 1 :]])
                all_texts = torch.cat([*cached_texts[:j], text_j, *cached_texts[j + 1 :]])
                # the scale and bias take their gradients from the last pass only
                if not last:
                    logit_scale = logit_scale.detach()
                    logit_bias = logit_bias.detach() if logit_bias is not None else None
                micro_loss = loss_fn(all_images, all_texts, logit_scale, logit_bias)
            run.scaler.scale(micro_loss).backward()
    return value


def _apply(run: RunState) -> bool:
    """Clip the gradients and step; False (and nothing applied) when their norm is not finite."""
    model = run.train_model
    run.scaler.unscale_(run.optimizer)
    norm = _clip_or_measure(model, run.opt.grad_clip_norm)
    # with fp16 the GradScaler itself skips steps whose gradients overflowed (and lowers its scale)
    if not torch.isfinite(norm) and not run.scaler.is_enabled():
        run.optimizer.zero_grad(set_to_none=True)
        run.progress.skip_step()
        return False
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    run.progress.bad_in_a_row = 0
    return True


def _clip_or_measure(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """The gradients' total norm, clipped to `max_norm` when one is set. Without one, clip_grad_norm_(inf) would
    multiply every gradient by 1.0 (a wasted pass, ~1% of a tiny model's step): measure the norm only."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _global_loss(run: RunState, loss: torch.Tensor) -> float:
    """The step's loss as a number: the mean over ranks (non-finite if any rank's is, so all skip together)."""
    return loss.item() if run.ctx is None else mean_over_ranks(loss, run.ctx.world_size)
