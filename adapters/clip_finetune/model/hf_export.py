"""Export a saved model to a Hugging Face transformers `CLIPModel` folder (`from_pretrained` loads it).

Only architectures that transformers' CLIP implements convert: open_clip's `CLIP` class with a plain
VisionTransformer image tower (class-token pooling, pre- and post-LayerNorm, a projection matrix) and its own
causal text transformer pooled at the end-of-text token, both with GELU or QuickGELU MLPs and open_clip's BPE
tokenizer. ViT-B-32, ViT-B-16, ViT-L-14 (and their -quickgelu variants) are such models; ResNet, ConvNeXt,
SigLIP, CoCa, EVA and Hugging Face text towers are not, and are refused with the reason.

Weight names follow transformers' own conversion script for OpenAI's checkpoints
(transformers/models/clip/convert_clip_original_pytorch_to_hf.py): the fused attention in-projection is split
into q, k and v; the projections are transposed (open_clip multiplies `x @ proj`, transformers applies a Linear).
The tokenizer files (vocab.json, merges.txt) are written from open_clip's own BPE table, in its token order, so
both tokenizers give the same ids.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .clip import ClipModel, load_artifact
from .weights import unwrap

CONVERTIBLE = "open_clip's CLIP with a ViT image tower and its own text transformer (e.g. ViT-B-32, ViT-B-16, ViT-L-14)"
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm default, as in OpenAI's CLIP


def _refuse(folder: str, why: str) -> ModelError:
    return ModelError(f"{folder!r} cannot be exported to transformers' CLIPModel: {why}; "
                      f"only {CONVERTIBLE} convert (export-onnx works for every architecture)")


def check_convertible(clip: ClipModel) -> None:
    """Raise ModelError naming what stops this model from becoming a transformers CLIPModel."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    model, where = unwrap(clip.model), clip.source
    if type(model) is not open_clip.CLIP:
        raise _refuse(where, f"its class is {type(model).__name__} (a Hugging Face or custom text tower)")
    visual, cfg = model.visual, clip.model_cfg
    if not isinstance(visual, VisionTransformer):
        raise _refuse(where, f"its image tower is a {type(visual).__name__}, not a ViT")
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    blockers = {
        "image pooling other than the class token": getattr(visual, "pool_type", "tok") != "tok",
        "an attentional pooler": getattr(visual, "attn_pool", None) is not None,
        "no LayerNorm before the image transformer": vision.get("no_ln_pre", False),
        "LayerNorm after pooling": vision.get("final_ln_after_pool", False) or text.get("final_ln_after_pool", False),
        "no image projection": getattr(visual, "proj", None) is None,
        "text pooling other than the end-of-text token": text.get("pool_type", "argmax") not in ("argmax", "eot"),
        "a text projection bias": text.get("proj_bias", False),
        "no causal text mask": text.get("no_causal_mask", False),
        "a custom tokenizer": bool(text.get("hf_tokenizer_name")) or text.get("vocab_size", 49408) != 49408,
        "layer scale": vision.get("ls_init_value") is not None or text.get("ls_init_value") is not None,
    }
    found = [name for name, present in blockers.items() if present]
    if found:
        raise _refuse(where, ", ".join(found))


def hf_config(clip: ClipModel) -> dict[str, Any]:
    """transformers' CLIPConfig (as keyword arguments) of the same architecture."""
    model = unwrap(clip.model)
    from open_clip.transformer import QuickGELU

    act = "quick_gelu" if isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU) else "gelu"
    visual, vision = model.visual, clip.model_cfg["vision_cfg"]
    v_width = visual.conv1.out_channels
    t_width = model.token_embedding.weight.shape[1]
    image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    return {
        "projection_dim": int(model.text_projection.shape[1]),
        "logit_scale_init_value": float(model.logit_scale.detach()),
        "text_config": {
            "vocab_size": int(model.token_embedding.weight.shape[0]), "hidden_size": t_width,
            "intermediate_size": model.transformer.resblocks[0].mlp.c_fc.out_features,
            "num_hidden_layers": len(model.transformer.resblocks),
            "num_attention_heads": model.transformer.resblocks[0].attn.num_heads,
            "max_position_embeddings": int(model.positional_embedding.shape[0]), "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        },
        "vision_config": {
            "hidden_size": v_width, "intermediate_size": visual.transformer.resblocks[0].mlp.c_fc.out_features,
            "num_hidden_layers": len(visual.transformer.resblocks),
            "num_attention_heads": visual.transformer.resblocks[0].attn.num_heads,
            "image_size": int(image_size), "patch_size": int(patch), "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS, "num_channels": int(vision.get("in_chans", 3)),
        },
    }


def _blocks(src: dict[str, torch.Tensor], src_prefix: str, dst_prefix: str, n: int) -> dict[str, torch.Tensor]:
    """One residual block each: open_clip's fused in-projection split into q, k, v (3 x [width, width])."""
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        s, d = f"{src_prefix}.{i}", f"{dst_prefix}.{i}"
        for name, w in zip("qkv", src[f"{s}.attn.in_proj_weight"].chunk(3), strict=True):
            out[f"{d}.self_attn.{name}_proj.weight"] = w
        for name, b in zip("qkv", src[f"{s}.attn.in_proj_bias"].chunk(3), strict=True):
            out[f"{d}.self_attn.{name}_proj.bias"] = b
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for theirs, ours in pairs.items():
            for p in ("weight", "bias"):
                out[f"{d}.{ours}.{p}"] = src[f"{s}.{theirs}.{p}"]
    return out


def hf_state_dict(clip: ClipModel) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' CLIPModel names."""
    model = unwrap(clip.model)
    src = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    n_text, n_vision = len(model.transformer.resblocks), len(model.visual.transformer.resblocks)
    out = {
        "logit_scale": src["logit_scale"],
        "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "text_model.final_layer_norm.weight": src["ln_final.weight"],
        "text_model.final_layer_norm.bias": src["ln_final.bias"],
        "text_projection.weight": src["text_projection"].T,  # open_clip: x @ P; transformers: Linear(x) = x @ W.T
        "vision_model.embeddings.class_embedding": src["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": src["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": src["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": src["visual.ln_pre.weight"],  # (sic: transformers' name)
        "vision_model.pre_layrnorm.bias": src["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": src["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": src["visual.ln_post.bias"],
        "visual_projection.weight": src["visual.proj"].T,
    }
    out |= _blocks(src, "transformer.resblocks", "text_model.encoder.layers", n_text)
    out |= _blocks(src, "visual.transformer.resblocks", "vision_model.encoder.layers", n_vision)
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_tokenizer_files(folder: Path, context_length: int) -> None:
    """vocab.json and merges.txt of open_clip's BPE tokenizer, in its token order, for transformers'
    CLIPTokenizer (its special tokens are spelled <|startoftext|> and <|endoftext|>)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]  # the slice open_clip's SimpleTokenizer takes
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=context_length)
    tok.save_pretrained(folder)


def _write_image_processor(folder: Path, clip: ClipModel, image_size: int) -> None:
    from transformers import CLIPImageProcessor

    pp = getattr(unwrap(clip.model).visual, "preprocess_cfg", {}) or {}
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        image_std=list(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
    ).save_pretrained(folder)


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir`: config.json, model.safetensors, the tokenizer and image-processor files, so that
    `transformers.CLIPModel.from_pretrained(out_dir)` and `CLIPProcessor.from_pretrained(out_dir)` load it.
    Written into a temporary folder beside `out_dir` and renamed into place (never half-written)."""
    try:
        from transformers import CLIPConfig, CLIPModel
    except ImportError:
        raise ModelError("export-hf needs transformers: pip install transformers") from None
    clip = load_artifact(model_dir, device="cpu", precision="fp32")
    check_convertible(clip)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{str(out)!r} exists and is not an empty folder; name a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = hf_config(clip)
    hf = CLIPModel(CLIPConfig(**kwargs))
    missing, unexpected = hf.load_state_dict(hf_state_dict(clip), strict=False)
    # position_ids are buffers transformers builds itself; anything else left unset would be random weights
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise _refuse(clip.source, f"weights left unmapped: {(missing + unexpected)[:5]}")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer_files(tmp, kwargs["text_config"]["max_position_embeddings"])
        _write_image_processor(tmp, clip, kwargs["vision_config"]["image_size"])
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
