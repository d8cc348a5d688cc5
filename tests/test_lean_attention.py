"""model/lean_attention.py: the copy-free self-attention gives torch's outputs and gradients, only where it
applies, and a model with it saves and loads as stock open_clip's."""

from __future__ import annotations

import copy

import open_clip
import torch
from helpers import TINY_MODEL, TINY_TRAINING
from torch import nn

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.model.clip import load_artifact, load_model, save_artifact
from adapters.clip_finetune.model.lean_attention import LeanMultiheadAttention, install, uninstall


def _plain_copy(model: nn.Module) -> nn.Module:
    plain = copy.deepcopy(model)
    assert uninstall(plain) == 4  # 2 image + 2 text layers
    return plain


def test_loaded_models_train_with_the_lean_attention_and_match_torchs_forward_and_gradients() -> None:
    clip = load_model(build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)}))
    lean_model = clip.model
    blocks = [m for m in lean_model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(blocks) == 4 and all(type(m) is LeanMultiheadAttention for m in blocks)  # 2 image + 2 text layers
    plain = _plain_copy(lean_model)
    assert not any(type(m) is LeanMultiheadAttention for m in plain.modules())
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = clip.tokenizer(["a red mug", "lamp", "Tasse in Blau", "striped sneaker", "", "a chair"])
    results = []
    for model in (lean_model, plain):
        model.train()
        out = model(images, tokens)
        open_clip.ClipLoss()(*out[:3]).backward()
        results.append(out)
    for got, want in zip(results[0][:2], results[1][:2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    grads = dict(plain.named_parameters())
    for name, p in lean_model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_other_call_runs_torchs_own_forward(monkeypatch) -> None:
    torch.manual_seed(0)
    lean = nn.MultiheadAttention(8, 2, batch_first=True)
    plain = copy.deepcopy(lean)
    assert install(lean) == 1 and install(lean) == 0 and type(lean) is LeanMultiheadAttention
    x, y = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    calls = {  # (args, kwargs) of torch's forward
        "lean: self-attention, float mask": ((x, x, x), {"need_weights": False, "attn_mask": causal}),
        "cross-attention": ((x, y, y), {"need_weights": False}),
        "weights asked for": ((x, x, x), {"need_weights": True}),
        "boolean mask (True: masked, the opposite of SDPA's)": ((x, x, x), {"need_weights": False,
                                                                          "attn_mask": causal.isinf()}),
        "padding mask": ((x, x, x), {"need_weights": False,
                                     "key_padding_mask": torch.tensor([[False] * 4 + [True]] * 3)}),
    }
    torchs = torch.nn.functional.multi_head_attention_forward
    ran: list[str] = []

    def counted(*args, **kwargs):
        ran.append(why)
        return torchs(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "multi_head_attention_forward", counted)
    for why, (args, kwargs) in calls.items():
        ran.clear()
        got = lean(*args, **kwargs)
        assert ran == ([] if why.startswith("lean") else [why])  # torch's forward ran for all but the lean call
        want = plain(*args, **kwargs)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6, msg=why)
        assert (got[1] is None) == (want[1] is None), why

    class Custom(nn.MultiheadAttention):
        pass
    assert install(nn.Sequential(Custom(8, 2, batch_first=True))) == 0  # a subclass keeps its own forward


def test_a_saved_model_loads_in_stock_open_clip_and_embeds_the_same(tmp_path) -> None:
    clip = load_model(build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)}))
    save_artifact(clip, tmp_path / "m")
    stock, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'm'}", device="cpu")
    assert not any(type(m) is LeanMultiheadAttention for m in stock.modules())
    ours = load_artifact(tmp_path / "m", "cpu").model
    assert any(type(m) is LeanMultiheadAttention for m in ours.modules())
    tokens = clip.tokenizer(["a red mug", "Tasse in Blau, gestreift"])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        stock.eval(), ours.eval()
        torch.testing.assert_close(ours.encode_text(tokens), stock.encode_text(tokens), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.encode_image(images), stock.encode_image(images), rtol=0, atol=1e-6)
