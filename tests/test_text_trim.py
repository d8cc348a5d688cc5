"""model/text_trim.py: a batch's tokens are cut after its last end-of-text token only where the text tower cannot
see past it, and then the features, the loss and every gradient are the full-length ones to float rounding."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from helpers import TINY_MODEL, TINY_TRAINING

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.model import text_trim
from adapters.clip_finetune.model.clip import ClipModel, load_model
from adapters.clip_finetune.retrieval.embed import encode_texts

CAPTIONS = ["a red mug", "Tasse in Blau, gestreift, mit Henkel und Punkten", "lamp", ""]


def _tiny(tmp_path: Path, name: str = "tiny", **text_cfg: object) -> ClipModel:
    """clip-tiny with `text_cfg` changes (custom_text=True: open_clip's TextTransformer), seeded."""
    config = json.loads(TINY_MODEL.read_text())
    if text_cfg:
        config["custom_text"] = True
        config["text_cfg"].update({k: v for k, v in text_cfg.items() if k != "custom_text"})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    return load_model(build_config({**TINY_TRAINING, "model_name": str(path)}))


@pytest.mark.parametrize("custom_text", [False, True], ids=["built-in text tower", "TextTransformer"])
def test_cut_tokens_give_the_full_length_features_loss_and_gradients(tmp_path: Path, custom_text: bool) -> None:
    clip = _tiny(tmp_path, custom_text=True) if custom_text else _tiny(tmp_path)
    full_model, cut_model = clip.model, copy.deepcopy(clip.model)
    tokens = clip.tokenizer(CAPTIONS)
    cut = text_trim.trim_tokens(cut_model, tokens)
    longest = int((tokens == tokens.max()).nonzero()[:, 1].max()) + 1  # the longest caption's end-of-text token
    assert tokens.shape[1] == 32 and cut.shape == (4, longest) and longest < 20
    assert torch.equal(cut, tokens[:, :longest])
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    losses = []
    for model, toks in ((full_model, tokens), (cut_model, cut)):
        out = text_trim.forward(model, images, toks)
        loss = open_clip.ClipLoss()(*out[:3])
        loss.backward()
        losses.append((out, float(loss.detach())))
    (full_out, full_loss), (cut_out, cut_loss) = losses
    torch.testing.assert_close(cut_out[1], full_out[1], rtol=0, atol=1e-5)  # text features
    assert torch.equal(cut_out[0], full_out[0])  # the image tower is untouched
    assert abs(cut_loss - full_loss) < 1e-5
    named = dict(cut_model.named_parameters())
    for name, p in full_model.named_parameters():
        q = named[name].grad
        assert q is not None and q.shape == p.shape, name  # the full parameter gets the gradient
        torch.testing.assert_close(q, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    positions = named["text.positional_embedding" if custom_text else "positional_embedding"]
    assert positions.grad[:longest].abs().sum() > 0 and positions.grad[longest:].abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(text_trim.encode_text(cut_model, cut), full_model.encode_text(tokens),
                                   rtol=0, atol=1e-5)


def test_towers_that_see_past_the_end_of_text_token_are_never_cut(tmp_path: Path) -> None:
    tokens = _tiny(tmp_path).tokenizer(CAPTIONS)
    towers = {"pool last": _tiny(tmp_path, "last", pool_type="last"),
              "bidirectional": _tiny(tmp_path, "bidir", no_causal_mask=True),
              "appended class token": _tiny(tmp_path, "cls", embed_cls=True)}
    for why, clip in towers.items():
        assert text_trim.trim_tokens(clip.model, tokens) is tokens, why
    plain = _tiny(tmp_path).model
    compiled_like = torch.nn.Sequential(plain)  # any wrapper calls the module itself
    assert text_trim.trim_tokens(compiled_like, tokens) is tokens
    with torch.no_grad():
        plain.attn_mask.fill_(0)  # a changed mask is not the causal one any more
    assert text_trim.trim_tokens(plain, tokens) is tokens
    full = torch.full((2, 32), 5)
    full[:, -1] = 49407  # the end-of-text token at the last position: nothing to cut
    assert text_trim.trim_tokens(_tiny(tmp_path).model, full) is full


def test_a_captions_vector_does_not_depend_on_the_longest_caption_in_its_batch(tmp_path: Path) -> None:
    clip = _tiny(tmp_path)
    alone = encode_texts(clip, ["lamp"])
    with_long = encode_texts(clip, ["lamp", "a very long caption " * 10])
    np.testing.assert_allclose(with_long[0], alone[0], rtol=0, atol=1e-6)
    assert float(alone[0] @ with_long[1]) < 0.999  # the other caption is really another vector
