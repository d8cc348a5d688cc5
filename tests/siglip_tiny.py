"""Offline stand-ins for SigLIP and SigLIP 2: open_clip's ViT-B-16-SigLIP / ViT-B-16-SigLIP2 model configs with
every setting kept and only the sizes reduced, random init, nothing downloaded.

- The image tower stays a timm VisionTransformer built with the settings of timm's vit_base_patch16_siglip_224
  (no class token, 'map' attention pooling), registered here under a new name at a small width, depth and image
  size (timm's register_model), so open_clip's TimmModel builds it exactly as it builds the real one.
- The tokenizer stays a Hugging Face fast tokenizer read from `hf_tokenizer_name`: for SigLIP a sentencepiece
  Unigram model in T5's layout (as the c4-en vocabulary: <pad> 0, </s> 1, </s> appended, padded with 1),
  for SigLIP 2 a sentencepiece-style BPE in Gemma's layout (<pad> 0, <eos> 1, <bos> 2; <eos> appended, no
  <bos>, padded with 0). Both are made here with the `tokenizers` library and saved into a local folder, which
  the model config names exactly as open_clip's names the hub's timm/ViT-B-16-SigLIP.
- The text tower, loss (init_logit_bias), text pooling, causal mask, projection bias, norm and activation
  settings and the context length (64) are open_clip's own values, copied from its built-in config.
- The preprocessing is that of open_clip's `webli` tag of these models (mean and std 0.5, bicubic, 'squash'),
  written as the `preprocess_cfg` of an open_clip_config.json, as a saved SigLIP model carries it.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from hf_tiny import tokenizer_corpus

from adapters.clip_finetune.data.synthetic import sample_specs

VISION_WIDTH = 64  # = embed_dim: the SigLIP image tower has no projection (timm_proj 'none')
IMAGE_SIZE = 32
PATCH_SIZE = 8
TIMM_NAME = f"vit_tiny_patch{PATCH_SIZE}_siglip_{IMAGE_SIZE}"  # the reduced vit_base_patch16_siglip_224
# open_clip's webli tags of ViT-B-16-SigLIP(2): pretrained._slpcfg (INCEPTION_MEAN / _STD are 0.5)
SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                     "resize_mode": "squash"}
# What a reduced config may change; every other key of the built-in config is kept as it is.
SIZE_KEYS = {"embed_dim", "image_size", "timm_model_name", "vocab_size", "hf_tokenizer_name", "width", "heads",
             "layers"}


def register_tiny_siglip_vit() -> str:
    """timm's vit_base_patch16_siglip_224 at a reduced size, registered as TIMM_NAME (once per process)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if TIMM_NAME in timm.list_models(TIMM_NAME):
        return TIMM_NAME

    def factory(pretrained: bool = False, **kwargs: Any) -> Any:
        # the same keyword settings as timm's vit_base_patch16_siglip_224; only sizes differ
        args = {"patch_size": PATCH_SIZE, "embed_dim": VISION_WIDTH, "depth": 2, "num_heads": 2,
                "class_token": False, "global_pool": "map", "img_size": IMAGE_SIZE}
        return _create_vision_transformer(TIMM_NAME, pretrained=pretrained, **{**args, **kwargs})

    factory.__name__ = TIMM_NAME  # timm registers a model under its function's name
    register_model(factory)
    return TIMM_NAME


def build_tiny_siglip(folder: Path, family: str = "siglip") -> Path:
    """Write a reduced `ViT-B-16-SigLIP` (family 'siglip') or `ViT-B-16-SigLIP2` ('siglip2') into `folder`:
    its tokenizer folder and an open_clip_config.json-style file (model_cfg + preprocess_cfg). Returns the path."""
    import open_clip

    builtin = {"siglip": "ViT-B-16-SigLIP", "siglip2": "ViT-B-16-SigLIP2"}[family]
    tokenizer_dir = folder / f"{family}-tokenizer"
    vocab_size = (_t5_unigram if family == "siglip" else _gemma_bpe)(tokenizer_dir)
    model_cfg = copy.deepcopy(open_clip.get_model_config(builtin))
    model_cfg["embed_dim"] = VISION_WIDTH
    model_cfg["vision_cfg"].update(image_size=IMAGE_SIZE, timm_model_name=register_tiny_siglip_vit())
    model_cfg["text_cfg"].update(vocab_size=vocab_size, hf_tokenizer_name=str(tokenizer_dir), width=64, heads=2,
                                 layers=2)
    path = folder / f"{family}-tiny.json"
    path.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": SIGLIP_PREPROCESS}, indent=2))
    return path


def changed_settings(family: str, model_cfg: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (built-in value, reduced value)} for every setting that differs from the built-in config, besides
    the sizes SIZE_KEYS allows to change."""
    import open_clip

    builtin = open_clip.get_model_config({"siglip": "ViT-B-16-SigLIP", "siglip2": "ViT-B-16-SigLIP2"}[family])
    out: dict[str, tuple[Any, Any]] = {}
    for scope, ours, theirs in (("", model_cfg, builtin), ("vision_cfg.", model_cfg["vision_cfg"],
                                                          builtin["vision_cfg"]),
                                ("text_cfg.", model_cfg["text_cfg"], builtin["text_cfg"])):
        for key in set(ours) | set(theirs):
            if key not in SIZE_KEYS and key not in ("vision_cfg", "text_cfg") and ours.get(key) != theirs.get(key):
                out[scope + key] = (theirs.get(key), ours.get(key))
    return out


def _words() -> list[str]:
    """Sentences the tokenizers learn from: hf_tiny's corpus plus a thousand synthetic captions."""
    return tokenizer_corpus() + [s.caption for s in sample_specs(1000, 99)]


def _t5_unigram(folder: Path) -> int:
    """A sentencepiece Unigram tokenizer in T5's layout (SigLIP's c4-en): whole "▁word" pieces scored by their
    frequency, single characters as the fallback. Built from counted pieces rather than trained: on so small a
    corpus the Unigram trainer keeps ~90 pieces and spells words out letter by letter."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for s in _words() for w in ("▁" + w for w in s.split()))
    counts.update(Counter(c for s in _words() for c in s.replace(" ", "▁")))  # every character, a fallback
    total = sum(counts.values())
    pieces = [(p, math.log(n / total)) for p, n in sorted(counts.items())]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    # SigLIP pads with </s> (open_clip's SigLipTokenizer sets pad_token_id 1 for the c4-en vocabulary)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="</s>",
                            padding_side="right").save_pretrained(folder)
    return tok.get_vocab_size()


def _gemma_bpe(folder: Path) -> int:
    """A sentencepiece-style BPE tokenizer in Gemma's layout (SigLIP 2): <eos> appended, no <bos>, <pad> 0."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_words(), trainers.BpeTrainer(vocab_size=400,
                                                           special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", pair="$A <eos> $B <eos>",
                                                       special_tokens=[("<eos>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>", padding_side="right").save_pretrained(folder)
    return tok.get_vocab_size()
