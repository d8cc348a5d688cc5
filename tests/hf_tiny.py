"""Offline stand-ins for multilingual CLIP: a tiny XLM-RoBERTa text tower, with a tokenizer trained here on
English and German sentences, and bilingual synthetic captions (German translations of synthetic.py's).

Nothing is downloaded: the transformer's config and the tokenizer are written with save_pretrained into a
local folder, and an open_clip model-config JSON names that folder as `hf_model_name` / `hf_tokenizer_name`,
exactly as open_clip's xlm-roberta-base-ViT-B-32 names the hub's `xlm-roberta-base`.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np

from adapters.clip_finetune.data.pairs import CaptionPair
from adapters.clip_finetune.data.synthetic import TEMPLATES, _caption, render, sample_specs

# --- German captions: synthetic.TEMPLATES translated, template by template -----------------------------------

GENDER = {"circle": "m", "square": "n", "triangle": "n", "cross": "n", "ring": "m"}  # der Kreis, das Quadrat, ...
SHAPES_DE = {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "cross": "Kreuz", "ring": "Ring"}
COLOURS_DE = {"red": "rot", "orange": "orange", "yellow": "gelb", "green": "grün", "cyan": "türkis",
              "blue": "blau", "purple": "lila", "pink": "rosa"}
UNINFLECTED = {"lila", "rosa"}  # colour adjectives that take no ending
SIZES_DE = {"small": ("klein", "winzig"), "large": ("groß", "riesig")}
POSITIONS_DE = {"left": ("links", "auf der linken Seite"), "right": ("rechts", "auf der rechten Seite"),
                "top": ("oben",), "bottom": ("unten",), "centre": ("in der Mitte", "mittig")}
BACKGROUNDS_DE = {"white": "weiß", "black": "schwarz", "grey": "grau", "beige": "beige"}
# Aligned with synthetic.TEMPLATES (same index, same meaning). Endings: {size}/{colour} nominative after
# "ein" or without article (m -er, n -es); {colour_dat} dative after "einem" (-en); {bg_dat} "auf weißem".
TEMPLATES_DE = (
    "ein {size} {colour} {shape} {position}",
    "ein {colour} {shape} {position}",
    "Foto von einem {colour_dat} {shape} {position} auf {bg_dat} Hintergrund",
    "{size} {colour} {shape}, {position}",
    "{position}: ein {size} {colour} {shape}",
    "ein {bg_nom} Hintergrund mit einem {colour_dat} {shape} {position}",
    "da ist ein {size} {colour} {shape} {position}",
    "{colour} {shape} ({size_bare}), {position}, Hintergrund {background}",
    "ein {size} {colour} {shape} auf {bg_dat} Hintergrund",
    "ein Bild von einem {colour_dat} {shape}",
)
assert len(TEMPLATES_DE) == len(TEMPLATES)


def _inflect(adjective: str, ending: str) -> str:
    if adjective in UNINFLECTED:
        return adjective
    return adjective + (ending[1:] if adjective.endswith("e") else ending)  # orange -> oranger, beige -> beigem


def german_caption(template: int, attrs: dict[str, str], rng: np.random.Generator) -> str:
    """The German caption of `attrs` in template `template` (the translation of TEMPLATES[template])."""
    text = TEMPLATES_DE[template]
    fields = {name for _, name, _, _ in string.Formatter().parse(text) if name}
    nominative = "er" if GENDER[attrs["shape"]] == "m" else "es"
    size = str(rng.choice(SIZES_DE[attrs["size"]]))
    colour, background = COLOURS_DE[attrs["colour"]], BACKGROUNDS_DE[attrs["background"]]
    words = {
        "size": _inflect(size, nominative),
        "size_bare": size,
        "colour": _inflect(colour, nominative),
        "colour_dat": _inflect(colour, "en"),
        "shape": SHAPES_DE[attrs["shape"]],
        "position": str(rng.choice(POSITIONS_DE[attrs["position"]])),
        "background": background,
        "bg_nom": _inflect(background, "er"),  # der Hintergrund: "ein weißer Hintergrund"
        "bg_dat": _inflect(background, "em"),  # "auf weißem Hintergrund"
    }
    return text.format(**{f: words[f] for f in fields})


def english_caption(template: int, attrs: dict[str, str], rng: np.random.Generator) -> str:
    return _caption(TEMPLATES[template], attrs, rng)


# --- data ----------------------------------------------------------------------------------------------------


def bilingual_pairs(folder: Path, n: int, seed: int) -> list[tuple[str, str, str]]:
    """Render `n` synthetic images into `folder`; return (image path, English caption, German caption) per image,
    the German caption a translation of the English one (same template, same attributes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 7919)
    out = []
    for i, sample in enumerate(sample_specs(n, seed)):
        path = folder / f"{i:05d}.png"
        render(sample).save(path)
        template = int(rng.integers(len(TEMPLATES)))
        out.append((str(path), english_caption(template, sample.attributes, rng),
                    german_caption(template, sample.attributes, rng)))
    return out


def mixed(rows: list[tuple[str, str, str]]) -> list[CaptionPair]:
    """One caption per image, English for even and German for odd images."""
    return [CaptionPair(image, de if i % 2 else en, f"{i}") for i, (image, en, de) in enumerate(rows)]


def in_language(rows: list[tuple[str, str, str]], language: str) -> list[CaptionPair]:
    column = {"en": 1, "de": 2}[language]
    return [CaptionPair(row[0], row[column], f"{i}") for i, row in enumerate(rows)]


# --- the tiny XLM-RoBERTa text tower -------------------------------------------------------------------------

XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0-3 as in XLM-R; <mask> next


def tokenizer_corpus(seed: int = 123, n: int = 24) -> list[str]:
    """A few dozen English and German sentences: captions of both languages and the attribute words."""
    rng = np.random.default_rng(seed)
    sentences = []
    for sample in sample_specs(n, seed):
        template = int(rng.integers(len(TEMPLATES)))
        sentences += [english_caption(template, sample.attributes, rng),
                      german_caption(template, sample.attributes, rng)]
    words_en = [*GENDER, *COLOURS_DE, "small tiny large big left right top bottom centre middle",
                "white black grey beige background photo image there is on at the in of with"]
    words_de = [*SHAPES_DE.values(), *(_inflect(c, e) for c in COLOURS_DE.values() for e in ("", "er", "es", "en")),
                *(_inflect(s, e) for v in SIZES_DE.values() for s in v for e in ("", "er", "es")),
                *(p for v in POSITIONS_DE.values() for p in v),
                *(_inflect(b, e) for b in BACKGROUNDS_DE.values() for e in ("", "er", "em")),
                "Foto Bild Hintergrund ein einem da ist auf von mit"]
    return sentences + [" ".join(words_en), " ".join(words_de)]


def build_tiny_xlmr(folder: Path, context_length: int = 32, width: int = 64, embed_dim: int = 64,
                    proj_type: str = "mlp") -> Path:
    """Train a BPE tokenizer on tokenizer_corpus(), save it and a tiny XLM-RoBERTa config into
    folder/xlmr-tiny; write folder/clip-xlmr-tiny.json (an open_clip model config naming that folder).
    Returns the model-config path."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig

    hf = folder / "xlmr-tiny"
    # BPE: on a few dozen sentences a Unigram model keeps ~150 pieces and cuts words into letters; BPE merges
    # the corpus's words whole, so captions stay short. Sentencepiece-style "▁word" pieces, as XLM-R's.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=XLMR_SPECIAL_TOKENS)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(  # <s> text </s>, as XLM-R
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    # A generic fast tokenizer: transformers 5's XLMRobertaTokenizer class rebuilds a Unigram model from the
    # saved vocabulary, so it cannot carry this BPE one. Loading goes through AutoTokenizer either way.
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                            cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                            mask_token="<mask>").save_pretrained(hf)
    XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * width, max_position_embeddings=context_length + 2,  # positions start at pad + 1
        type_vocab_size=1, pad_token_id=tok.token_to_id("<pad>"), bos_token_id=bos, eos_token_id=eos,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ).save_pretrained(hf)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "head_width": 32, "patch_size": 8},
        "text_cfg": {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf), "hf_model_pretrained": False,
                     "hf_proj_type": proj_type, "hf_pooler_type": "mean_pooler", "context_length": context_length},
    }
    path = folder / "clip-xlmr-tiny.json"
    path.write_text(json.dumps(model_cfg, indent=2))
    return path
