"""The contrastive loss of a step: open_clip's ClipLoss (softmax), or its SigLipLoss for models with a
logit_bias (SigLIP), made duplicate-aware: pairs of a batch that share an image (file content) or a
normalised caption are not negatives of each other.

Both open_clip losses add `logit_bias` to the logits before their softmax / sigmoid, so the duplicates are
masked through it: -inf on their logits takes them out of the softmax, and out of the sigmoid loss (whose
negative terms -log sigmoid(-(logit)) are then 0). The loss stays open_clip's own; docs/data.md measures it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# open_clip's ClipLoss gathers features of the other ranks with torch.distributed.nn.all_gather, which torch
# deprecates; the warning is for open_clip, not for our users, and came on every step of every rank (48 lines in
# a short two-process run). Only that message is silenced.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)

Keys = tuple[torch.Tensor, torch.Tensor]  # (image ids [n], caption ids [n]) of the pairs of a batch, int64


class ContrastiveLoss:
    """loss(image_features, text_features, logit_scale, logit_bias=None, keys=None) -> scalar tensor: `base`
    (an open_clip ClipLoss, or SigLipLoss when `sigmoid`) with duplicates masked when `duplicate_aware`."""

    def __init__(self, base: Callable[..., torch.Tensor], sigmoid: bool, duplicate_aware: bool, rank: int = 0,
                 world_size: int = 1) -> None:
        self.loss, self.sigmoid, self.rank, self.world_size = base, sigmoid, rank, world_size
        # SigLipLoss scores the other ranks' texts in chunks passed round the ring, with the one logit_bias: a mask
        # of this rank's pairs would land on theirs too
        self.duplicate_aware = duplicate_aware and not (sigmoid and world_size > 1)
        if duplicate_aware and not self.duplicate_aware and rank == 0:
            log.warning("duplicate_aware_loss: not applied to the SigLIP loss across %d processes (open_clip's "
                        "ring exchange shares one logit_bias among all ranks' texts)", world_size)

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None, keys: Keys | None = None) -> torch.Tensor:
        mask = self.duplicate_mask(keys) if self.duplicate_aware and keys is not None else None
        if mask is not None:
            logit_bias = mask if logit_bias is None else logit_bias + mask
        if self.sigmoid:
            return self.loss(image_features, text_features, logit_scale, logit_bias)
        if logit_bias is None:  # a batch without duplicates: exactly open_clip's call
            return self.loss(image_features, text_features, logit_scale)
        return self.loss(image_features, text_features, logit_scale, logit_bias)

    def duplicate_mask(self, keys: Keys) -> torch.Tensor | None:
        """[n, n_global] float: -inf where local pair i and pair j (of the whole, gathered batch) are different
        pairs sharing an image or a caption, 0 elsewhere; None when there is no such pair. The rows and columns
        are those of open_clip's logits (with several processes, its local_loss layout)."""
        image_ids, caption_ids = keys
        n = image_ids.shape[0]
        offset = 0
        all_images, all_captions = image_ids, caption_ids
        if self.world_size > 1:
            all_images, all_captions = _gather(image_ids, self.world_size), _gather(caption_ids, self.world_size)
            offset = self.rank * n
        shared = (image_ids[:, None] == all_images[None, :]) | (caption_ids[:, None] == all_captions[None, :])
        own = torch.arange(n, device=shared.device)
        shared[own, own + offset] = False  # a pair is its own positive
        if not bool(shared.any()):
            return None
        return torch.zeros(shared.shape, device=shared.device).masked_fill_(shared, float("-inf"))


def _gather(t: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts)
