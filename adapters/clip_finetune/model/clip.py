"""Build, load and save open_clip models.

A saved model is an open_clip `local-dir` folder (`open_clip_config.json` + `open_clip_model.safetensors`)
that stock `open_clip.create_model_and_transforms("local-dir:DIR")` loads, plus this project's
`finetune_config.json` and `metrics.json`. A model whose text tower is a Hugging Face transformer (e.g.
multilingual xlm-roberta-base-ViT-B-32) also keeps that transformer's `config.json` and its tokenizer files
there, so it loads offline (docs/multilingual.md).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.push_to_hf_hub import save_config_for_hf
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save_file

from ..config import FinetuneConfig, architecture_config
from ..errors import ModelError
from ..files import atomic_write
from .weights import unwrap

log = logging.getLogger(__name__)

FINETUNE_CONFIG_NAME = "finetune_config.json"
HF_TEXT_CONFIG_NAME = "config.json"  # a Hugging Face text tower's transformers config, saved beside the weights
METRICS_NAME = "metrics.json"


@dataclass(frozen=True)
class TokenizerLater:
    """open_clip.get_tokenizer(spec), made when first used: building open_clip's BPE tokenizer takes ~0.3 s
    (profiled), which a process that only embeds images never needs."""

    spec: str


class _Tokenizer:
    """ClipModel.tokenizer: what was given, a TokenizerLater made into the tokenizer at the first read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: Any, objtype: type | None = None) -> Callable:
        if obj is None:
            raise AttributeError("tokenizer")  # a required field, without a default
        tokenizer = obj.__dict__[self.slot]
        if isinstance(tokenizer, TokenizerLater):
            tokenizer = obj.__dict__[self.slot] = open_clip.get_tokenizer(tokenizer.spec)
        return tokenizer

    def __set__(self, obj: Any, tokenizer: Callable) -> None:
        obj.__dict__[self.slot] = tokenizer


@dataclass
class ClipModel:
    """An open_clip model with everything needed to feed it: transforms, tokenizer and its config."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess: Callable  # evaluation/embedding transform (resize, centre crop, normalise)
    tokenizer: Callable = _Tokenizer()  # given as the tokenizer, or a TokenizerLater; read: the tokenizer
    model_cfg: dict[str, Any]  # open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    source: str  # what it was loaded from, for logs
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def is_artifact_dir(path: str | Path | None) -> bool:
    """True if `path` is a saved model folder (open_clip local-dir layout)."""
    return bool(path) and (Path(path).expanduser() / HF_CONFIG_NAME).is_file()


def pick_device(requested: str | None = None) -> torch.device:
    """The requested torch device, else CUDA when available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(cfg: FinetuneConfig, device: torch.device | str | None = None) -> ClipModel:
    """Build the model that `cfg` describes: a saved artifact folder, a name + pretrained tag, or a
    config (JSON path or name) with random init under `cfg.seed` when `pretrained` is null."""
    device = pick_device(str(device) if device else cfg.device)
    if is_artifact_dir(cfg.pretrained):
        return load_artifact(cfg.pretrained, device)
    model_cfg = copy.deepcopy(architecture_config(cfg.model_name))
    name = _register(cfg.model_name, model_cfg)
    kwargs: dict[str, Any] = {}
    hf_text = hf_text_cfg(model_cfg)
    if hf_text is not None:
        _check_hf_text(name, hf_text)
        # open_clip ignores text_cfg.hf_model_pretrained: whenever no full CLIP checkpoint is loaded it downloads
        # the transformer's own pretrained weights. Honour the config; absent, random init (as pretrained: null says).
        kwargs["pretrained_text"] = bool(hf_text.get("hf_model_pretrained", False))
    if cfg.pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(name, cfg.pretrained)
        # open_clip 3.x builds e.g. ViT-B-32 with GELU even for the 'openai' tag, trained with QuickGELU,
        # and only warns: force the activation the weights were trained with.
        if tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
            model_cfg["quick_gelu"] = True
            kwargs["force_quick_gelu"] = True
        if not tag_cfg and not Path(cfg.pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ModelError(
                f"pretrained: {cfg.pretrained!r} is neither a pretrained tag of {name!r} "
                f"(known: {', '.join(tags) or 'none'}), a weights file, nor a saved model folder"
            )
    try:
        # random init (all of it with pretrained null, parts of it otherwise) is drawn under the config's seed,
        # on a forked generator: the same config builds the same weights whatever ran before in the process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model, pp_train, pp_val = open_clip.create_model_and_transforms(
                name, pretrained=cfg.pretrained, device=device, **kwargs
            )
        tokenizer = open_clip.get_tokenizer(name)
    # open_clip raises RuntimeError for failed downloads / bad files; transformers OSError for a missing
    # folder, file or unreachable hub
    except (RuntimeError, OSError) as e:
        raise ModelError(f"cannot load {name!r} with pretrained={cfg.pretrained!r}: {e}{_hf_hint(hf_text)}") from e
    source = f"{name} ({cfg.pretrained or 'random init'})"
    log.info("loaded %s on %s", source, device)
    return ClipModel(model, pp_train, pp_val, tokenizer, model_cfg, source)


def hf_text_cfg(model_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The text_cfg of a model whose text tower is a Hugging Face transformer (hf_model_name), else None."""
    text_cfg = model_cfg.get("text_cfg") or {}
    return text_cfg if text_cfg.get("hf_model_name") else None


def _require_transformers(what: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ModelError(
            f"{what!r} has a Hugging Face text tower, which needs the transformers package: "
            "pip install 'clip-finetune[multilingual]' (or pip install transformers)"
        )


def _check_hf_text(name: str, hf_text: dict[str, Any]) -> None:
    """transformers installed; text_cfg's folders exist (transformers would take a missing one for a hub id)."""
    _require_transformers(name)
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = str(hf_text.get(key) or "")
        if value.startswith(("/", ".", "~")) and not Path(value).expanduser().is_dir():
            raise ModelError(f"{name!r}: text_cfg.{key} {value!r} is no folder; give a folder holding the "
                             "transformer's config.json (hf_model_name) or tokenizer files, or a hub id")


def _hf_hint(hf_text: dict[str, Any] | None) -> str:
    if hf_text is None:
        return ""
    return (f" (the Hugging Face text tower {hf_text['hf_model_name']!r} and tokenizer "
            f"{hf_text.get('hf_tokenizer_name')!r} must be local folders or reachable on the Hugging Face hub)")


def _register(model_name: str, model_cfg: dict[str, Any]) -> str:
    """Make a config-JSON architecture known to open_clip under its file stem; return the name to use."""
    if not model_name.endswith(".json"):
        return model_name
    name = Path(model_name).stem
    # open_clip's registry is keyed by name: add_model_config reads a folder or file of configs.
    # We register from a temporary copy holding only model_cfg (the file may be an artifact config).
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)
    return name


def load_artifact(path: str | Path, device: torch.device | str | None = None) -> ClipModel:
    """Load a saved model folder exactly as stock open_clip does (`local-dir:` schema)."""
    folder = Path(path).expanduser().resolve()
    if not is_artifact_dir(folder):
        raise ModelError(f"{str(folder)!r} is not a saved model folder (no {HF_CONFIG_NAME})")
    if not (folder / HF_SAFE_WEIGHTS_NAME).is_file():
        raise ModelError(f"{str(folder)!r} has no {HF_SAFE_WEIGHTS_NAME}; refusing to load random weights")
    device = pick_device(str(device) if device else None)
    spec = f"local-dir:{folder}"
    model_cfg = json.loads((folder / HF_CONFIG_NAME).read_text())["model_cfg"]
    kwargs: dict[str, Any] = {}
    hf_text = hf_text_cfg(model_cfg)
    if hf_text is not None:
        _require_transformers(str(folder))
        if (folder / HF_TEXT_CONFIG_NAME).is_file():
            # the transformer's config saved beside the weights (save_artifact): offline, wherever the folder
            # now lies; the full CLIP weights load next, so no pretrained text weights are fetched
            kwargs["text_cfg"] = {**hf_text, "hf_model_name": str(folder), "hf_model_pretrained": False}
    try:
        model, pp_train, pp_val = open_clip.create_model_and_transforms(
            spec, device=device, weights_only=True, **kwargs
        )
        # an HF tokenizer is read from the folder itself (now: a missing file is this error, not a later one)
        tokenizer = open_clip.get_tokenizer(spec) if hf_text is not None else TokenizerLater(spec)
    except OSError as e:  # transformers: a missing config or tokenizer file, an unreachable hub
        raise ModelError(f"cannot load the saved model {str(folder)!r}: {e}{_hf_hint(hf_text)}") from e
    extra = {}
    if (folder / FINETUNE_CONFIG_NAME).is_file():
        extra["finetune_config"] = json.loads((folder / FINETUNE_CONFIG_NAME).read_text())
    log.info("loaded saved model %s on %s", folder, device)
    return ClipModel(model, pp_train, pp_val, tokenizer, model_cfg, str(folder), extra)


def save_artifact(
    clip: ClipModel,
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    metrics: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `clip` (or `state_dict`, e.g. the best epoch's weights) as an open_clip local-dir folder.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(clip.model)
    model_cfg = clip.model_cfg
    if hf_text_cfg(model_cfg) is not None:
        model_cfg = _save_hf_text_files(clip, model, out)
    tensors = state_dict if state_dict is not None else model.state_dict()
    # safetensors refuses views of shared storage: store plain, contiguous CPU copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(out / HF_SAFE_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / HF_CONFIG_NAME, lambda p: save_config_for_hf(model, p, model_config=model_cfg))
    if cfg is not None:
        atomic_write(out / FINETUNE_CONFIG_NAME, lambda p: p.write_text(cfg.model_dump_json(indent=2)))
    if metrics is not None:
        atomic_write(out / METRICS_NAME, lambda p: p.write_text(json.dumps(metrics, indent=2)))
    return out


def _save_hf_text_files(clip: ClipModel, model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """Write the Hugging Face text tower's config.json and tokenizer files into `out`; return the model config
    to save with them.

    Stock open_clip reads the tokenizer of a `local-dir:` model from the folder itself, and builds the text
    tower from text_cfg.hf_model_name (a hub id or a folder) before loading the CLIP weights. A hub id is kept
    (stock loading fetches only its small config.json); a local folder, which may not outlive the artifact, is
    replaced by this folder's absolute path. load_artifact always reads the copy inside the folder.
    """
    text_cfg = dict(clip.model_cfg["text_cfg"], hf_model_pretrained=False)  # the CLIP weights hold the text tower
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key) and Path(text_cfg[key]).expanduser().is_dir():
            text_cfg[key] = str(out.resolve())
    tokenizer = clip.tokenizer
    if not hasattr(tokenizer, "save_pretrained") and text_cfg.get("hf_tokenizer_name"):
        tokenizer = HFTokenizer(clip.model_cfg["text_cfg"]["hf_tokenizer_name"])
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-text-") as tmp:
        model.text.config.save_pretrained(tmp)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():  # each file renamed into place whole, as atomic_write does
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(f, out / f.name)
    return {**clip.model_cfg, "text_cfg": text_cfg}
