"""training/loss.py: the contrastive loss is open_clip's own (ClipLoss, or SigLipLoss for SigLIP models), with
pairs of a batch that share an image or a normalised caption kept out of each other's negatives."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from adapters.clip_finetune.training.loss import ContrastiveLoss


def _features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(),
            F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_())


def _keys(images: list[int], captions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(images), torch.tensor(captions)


def test_without_duplicates_the_loss_is_open_clips_own() -> None:
    img, txt = _features(6)
    scale, bias = torch.tensor(20.0), torch.tensor([-5.0])
    keys = _keys(list(range(6)), list(range(6)))
    ours = ContrastiveLoss(open_clip.ClipLoss(), False, duplicate_aware=True)(img, txt, scale, None, keys)
    assert torch.equal(ours, open_clip.ClipLoss()(img, txt, scale))
    ours = ContrastiveLoss(SigLipLoss(), True, duplicate_aware=True)(img, txt, scale, bias, keys)
    assert torch.equal(ours, SigLipLoss()(img, txt, scale, bias))


def test_pairs_sharing_an_image_or_caption_are_masked_out_of_each_others_negatives() -> None:
    img, txt = _features(5, seed=1)
    scale = torch.tensor(10.0)
    # pairs 0 and 1: two captions of one image; pairs 2 and 3: two images with one title; pair 4 alone
    keys = _keys([0, 0, 1, 2, 3], [0, 1, 2, 2, 3])
    loss = ContrastiveLoss(open_clip.ClipLoss(), False, duplicate_aware=True)(img, txt, scale, None, keys)
    logits = scale * img @ txt.T
    masked = logits.clone()
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 2)):
        masked[i, j] = float("-inf")
    labels = torch.arange(5)
    expected = (F.cross_entropy(masked, labels) + F.cross_entropy(masked.T, labels)) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()
    plain = ContrastiveLoss(open_clip.ClipLoss(), False, duplicate_aware=False)(img, txt, scale, None, keys)
    assert plain > loss  # the false negatives no longer count against the model


def test_the_sigmoid_loss_drops_the_duplicates_negative_terms() -> None:
    img, txt = _features(4, seed=2)
    scale, bias = torch.tensor(10.0), torch.tensor([-3.0])
    keys = _keys([0, 0, 1, 2], [0, 1, 2, 3])
    loss = ContrastiveLoss(SigLipLoss(), True, duplicate_aware=True)(img, txt, scale, bias, keys)
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(4) - 1
    terms = -F.logsigmoid(labels * logits)
    terms[0, 1] = terms[1, 0] = 0  # the two captions of image 0 are no negatives of each other
    torch.testing.assert_close(loss, terms.sum() / 4)


def test_the_sigmoid_loss_across_processes_is_not_masked_and_says_so(caplog) -> None:
    # open_clip's SigLipLoss passes the other ranks' texts round a ring with this rank's one logit_bias: a mask of
    # this rank's pairs would land on theirs, so the loss stays unmasked and the log says why
    with caplog.at_level("WARNING"):
        loss = ContrastiveLoss(SigLipLoss(), True, duplicate_aware=True, rank=0, world_size=2)
    assert not loss.duplicate_aware
    assert "duplicate_aware_loss: not applied to the SigLIP loss across 2 processes" in caplog.text
    with caplog.at_level("WARNING"):
        caplog.clear()
        assert ContrastiveLoss(SigLipLoss(), True, duplicate_aware=True, rank=1, world_size=2).duplicate_aware is False
    assert caplog.text == ""  # said once, by rank 0
    assert ContrastiveLoss(open_clip.ClipLoss(), False, duplicate_aware=True, rank=0, world_size=2).duplicate_aware
