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
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..architecture import architecture_config, hf_tokenizer_name, model_cfg_of
from ..config import FinetuneConfig
from ..errors import ConfigError, ModelError
from ..files import atomic_write
from ..inputs import MAX_CONFIG_BYTES, Unreadable, file_problem, read_json
from ..sections import ModelSection
from . import lean_attention
from .card import write_model_card
from .lazy_tokenizer import LazyTokenizer, TokenizerLater, shared_tokenizer
from .load_parts import (
    check_embeddings_size,
    is_openai_weights_file,
    model_request,
    preprocess_kwargs,
    quiet_config_log,
    weights_for,
)
from .precision import resolve_precision
from .safe_load import (
    check_device,
    check_safetensors,
    check_tokenizer_files,
    is_pickle_refusal,
    refused_pickle,
    weights_mismatch,
)
from .weights import unwrap

log = logging.getLogger(__name__)

FINETUNE_CONFIG_NAME = "finetune_config.json"
HF_TEXT_CONFIG_NAME = "config.json"  # a Hugging Face text tower's transformers config, saved beside the weights
METRICS_NAME = "metrics.json"


@dataclass
class ClipModel:
    """An open_clip model with everything needed to feed it: transforms, tokenizer and its config."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess: Callable  # evaluation/embedding transform (resize, centre crop, normalise)
    tokenizer: Callable = LazyTokenizer()  # given as the tokenizer, or a TokenizerLater; read: the tokenizer
    model_cfg: dict[str, Any]  # open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    source: str  # what it was loaded from, for logs
    extra: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # resolved for its device and model (precision.resolve_precision): training

    def use_precision(self, requested: str) -> None:
        """Resolve `requested` (a FinetuneConfig.precision) for the device the model is on now."""
        self.precision = resolve_precision(requested, self.device, self.model_cfg)

    @property
    def inference_precision(self) -> str:
        """What embedding and evaluation run in: the model's precision on CUDA; fp32 on a CPU, where the vectors
        then equal stock open_clip's (CPU bf16 is a training choice, docs/performance.md)."""
        return self.precision if self.device.type == "cuda" else "fp32"

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def is_artifact_dir(path: str | Path | None) -> bool:
    """True if `path` is a saved model folder (open_clip local-dir layout)."""
    return bool(path) and file_problem(Path(path).expanduser() / HF_CONFIG_NAME) is None


def pick_device(requested: str | None = None) -> torch.device:
    """The requested torch device (ConfigError when this machine lacks it), else CUDA when available, else CPU."""
    if requested:
        return check_device(torch.device(requested))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model: ModelSection | FinetuneConfig, device: torch.device | str | None = None,
               seed: int | None = None) -> ClipModel:
    """Build the model a model section describes: a saved artifact folder, a name + pretrained tag, or a config
    (JSON path or name) with random init under `seed` when `pretrained` is null. A whole FinetuneConfig stands
    for its model section, device and seed. An embeddings_size that contradicts the model is a ConfigError."""
    m, device, seed = model_request(model, device, seed)
    device = pick_device(str(device) if device else None)
    if is_artifact_dir(m.pretrained):
        clip = load_artifact(m.pretrained, device, m.precision)
        check_embeddings_size(m.embeddings_size, m.model_name, clip.embed_dim)
        return clip
    model_cfg = copy.deepcopy(architecture_config(m.model_name))
    check_embeddings_size(m.embeddings_size, m.model_name, int(model_cfg["embed_dim"]))  # before weights are read
    name = _register(m.model_name, model_cfg)
    kwargs: dict[str, Any] = {}
    hf_text = hf_text_cfg(model_cfg)
    if hf_text is not None or hf_tokenizer_name(model_cfg):
        _check_hf_text(name, model_cfg["text_cfg"])
    if hf_text is not None:
        # open_clip ignores text_cfg.hf_model_pretrained: whenever no full CLIP checkpoint is loaded it downloads
        # the transformer's own pretrained weights. Honour the config; absent, random init (as pretrained: null says).
        kwargs["pretrained_text"] = bool(hf_text.get("hf_model_pretrained", False))
    if m.pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(name, m.pretrained)
        # open_clip 3.x builds e.g. ViT-B-32 with GELU even for the 'openai' tag, trained with QuickGELU,
        # and only warns: force the activation the weights were trained with. A weights FILE has no tag to ask:
        # OpenAI's own files (and files named for them) get QuickGELU too.
        quick_gelu = tag_cfg.get("quick_gelu") or (not tag_cfg and is_openai_weights_file(m.pretrained))
        if quick_gelu and not model_cfg.get("quick_gelu"):
            model_cfg["quick_gelu"] = True
            kwargs["force_quick_gelu"] = True
        if not tag_cfg and not Path(m.pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ModelError(
                f"pretrained: {m.pretrained!r} is neither a pretrained tag of {name!r} "
                f"(known: {', '.join(tags) or 'none'}), a weights file, nor a saved model folder"
            )
    kwargs.update(preprocess_kwargs(m.model_name, name, m.pretrained))
    try:
        # random init (all of it with pretrained null, parts of it otherwise) is drawn under the seed, on a
        # forked generator: the same config builds the same weights whatever ran before in the process
        with weights_for(name, m.pretrained), quiet_config_log(m.model_name), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model_, pp_train, pp_val = open_clip.create_model_and_transforms(
                name, pretrained=m.pretrained, device=device, **kwargs
            )
        tokenizer = shared_tokenizer(name)
    # open_clip raises RuntimeError for failed downloads / bad files; transformers OSError for a missing
    # folder, file or unreachable hub; torch.load(weights_only=True) UnpicklingError for a pickle it refuses
    except Exception as e:
        clean = _build_error(e, name, m, hf_text)
        if clean is e:
            raise
        raise clean from e
    arch = f"{name} from {m.model_name}" if m.model_name.endswith(".json") else name
    log.info("loaded %s on %s", f"{arch} ({m.pretrained or 'random init'})", device)
    lean_attention.install(model_)
    clip = ClipModel(model_, pp_train, pp_val, tokenizer, model_cfg, f"{arch} ({m.pretrained or 'random init'})")
    clip.use_precision(m.precision)
    return clip



def _build_error(e: Exception, name: str, cfg: ModelSection, hf_text: dict[str, Any] | None) -> Exception:
    """What a failed build of a configured model tells the user; an error that no input explains is returned as
    it is (a bug of ours: it stays a traceback)."""
    weights_file = bool(cfg.pretrained) and file_problem(cfg.pretrained) is None
    if weights_file and is_pickle_refusal(e):
        return refused_pickle(cfg.pretrained, "pretrained:", e)
    if isinstance(e, SafetensorError) and weights_file:
        return ModelError(f"pretrained: {cfg.pretrained!r} is not a whole safetensors file ({e}); download it again")
    if weights_file and isinstance(e, RuntimeError) and "state_dict" in str(e):
        return weights_mismatch(cfg.pretrained, e, f"the architecture {name!r}")
    if isinstance(e, RuntimeError | OSError) or (cfg.model_name.endswith(".json") and isinstance(
            e, TypeError | KeyError | ValueError | AttributeError)):  # open_clip meeting a malformed model config
        what = f"the model config {cfg.model_name!r}" if cfg.model_name.endswith(".json") else repr(name)
        return ModelError(f"cannot build {what} with pretrained={cfg.pretrained!r}: {type(e).__name__}: "
                          f"{_first_line(e)}{_hf_hint(hf_text)}")
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def hf_text_cfg(model_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The text_cfg of a model whose text tower is a Hugging Face transformer (hf_model_name), else None."""
    text_cfg = model_cfg.get("text_cfg") or {}
    return text_cfg if text_cfg.get("hf_model_name") else None


def _require_transformers(what: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ModelError(
            f"{what!r} has a Hugging Face text tower or tokenizer, which needs the transformers package: "
            "pip install -e \".[multilingual]\" in this checkout (or pip install transformers)"
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


def load_artifact(path: str | Path, device: torch.device | str | None = None, precision: str = "auto") -> ClipModel:
    """Load a saved model folder exactly as stock open_clip does (`local-dir:` schema); `precision` (a
    FinetuneConfig.precision) is resolved for the device."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        found = "a file" if folder.exists() else "it does not exist"
        raise ModelError(f"{str(folder)!r} is not a saved model folder ({found}); give a folder a training wrote")
    if not is_artifact_dir(folder):
        raise ModelError(f"{str(folder)!r} is not a saved model folder (no {HF_CONFIG_NAME})")
    if not (folder / HF_SAFE_WEIGHTS_NAME).is_file():
        raise ModelError(f"{str(folder)!r} has no {HF_SAFE_WEIGHTS_NAME}; refusing to load random weights")
    device = pick_device(str(device) if device else None)
    spec = f"local-dir:{folder}"
    model_cfg = _saved_model_cfg(folder)
    check_safetensors(folder / HF_SAFE_WEIGHTS_NAME, "the saved weights")
    kwargs: dict[str, Any] = {}
    hf_text = hf_text_cfg(model_cfg)
    if hf_text is not None or hf_tokenizer_name(model_cfg):
        _require_transformers(str(folder))
        check_tokenizer_files(folder, hf_tokenizer_name(model_cfg))
    if hf_text is not None and (folder / HF_TEXT_CONFIG_NAME).is_file():
        # the transformer's config saved beside the weights (save_artifact): offline, wherever the folder
        # now lies; the full CLIP weights load next, so no pretrained text weights are fetched
        kwargs["text_cfg"] = {**hf_text, "hf_model_name": str(folder), "hf_model_pretrained": False}
    try:
        model, pp_train, pp_val = open_clip.create_model_and_transforms(
            spec, device=device, weights_only=True, **kwargs
        )
        # an HF tokenizer is read from the folder itself (now: a missing file is this error, not a later one)
        tokenizer = open_clip.get_tokenizer(spec) if hf_tokenizer_name(model_cfg) else TokenizerLater(spec)
    except OSError as e:  # transformers: a missing config or tokenizer file, an unreachable hub
        raise ModelError(f"cannot load the saved model {str(folder)!r}: {e}{_hf_hint(hf_text)}") from e
    except RuntimeError as e:  # load_state_dict: weights of another architecture
        raise weights_mismatch(folder / HF_SAFE_WEIGHTS_NAME, e, "the architecture in its open_clip_config.json") \
            from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # open_clip meeting a malformed model_cfg
        raise ModelError(f"open_clip cannot build the architecture in {str(folder / HF_CONFIG_NAME)!r} "
                         f"({type(e).__name__}: {_first_line(e)}); save the model again") from e
    extra = {}
    if (folder / FINETUNE_CONFIG_NAME).exists():
        try:
            extra["finetune_config"] = read_json(folder / FINETUNE_CONFIG_NAME, MAX_CONFIG_BYTES)
        except Unreadable as e:  # only the WiSE-FT sweep reads it; the model itself is whole
            log.warning("ignoring %s", e)
    log.info("loaded saved model %s on %s", folder, device)
    lean_attention.install(model)
    clip = ClipModel(model, pp_train, pp_val, tokenizer, model_cfg, str(folder), extra)
    clip.use_precision(precision)
    return clip


def _saved_model_cfg(folder: Path) -> dict[str, Any]:
    """model_cfg of a saved model's open_clip_config.json, read bounded and checked before open_clip reads it."""
    try:
        data = read_json(folder / HF_CONFIG_NAME, MAX_CONFIG_BYTES)
    except Unreadable as e:
        raise ModelError(f"the saved model's {e}") from None
    try:
        return model_cfg_of(data.get("model_cfg") if isinstance(data, dict) else None,
                            f"{str(folder / HF_CONFIG_NAME)!r}")
    except ConfigError as e:
        raise ModelError(f"{e}; save the model again") from None


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
    if hf_text_cfg(model_cfg) is not None or hf_tokenizer_name(model_cfg):
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
    write_model_card(out)  # README.md: what the folder now holds, in the Hub's model-card format
    return out


def _save_hf_text_files(clip: ClipModel, model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """Write the Hugging Face text tower's config.json (if it has one) and tokenizer files into `out`; return the
    model config to save with them. SigLIP's own text tower has an HF tokenizer alone: its files are saved too.

    Stock open_clip reads the tokenizer of a `local-dir:` model from the folder itself, and builds the text
    tower from text_cfg.hf_model_name (a hub id or a folder) before loading the CLIP weights. A hub id is kept
    (stock loading fetches only its small config.json); a local folder, which may not outlive the artifact, is
    replaced by this folder's absolute path. load_artifact always reads the copy inside the folder.
    """
    hf_model = hf_text_cfg(clip.model_cfg) is not None
    text_cfg = dict(clip.model_cfg["text_cfg"])
    if hf_model:
        text_cfg["hf_model_pretrained"] = False  # the CLIP weights hold the text tower
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key) and Path(text_cfg[key]).expanduser().is_dir():
            text_cfg[key] = str(out.resolve())
    tokenizer = clip.tokenizer
    if not hasattr(tokenizer, "save_pretrained") and text_cfg.get("hf_tokenizer_name"):
        tokenizer = HFTokenizer(clip.model_cfg["text_cfg"]["hf_tokenizer_name"])
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-text-") as tmp:
        if hf_model:
            model.text.config.save_pretrained(tmp)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():  # each file renamed into place whole, as atomic_write does
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(f, out / f.name)
    return {**clip.model_cfg, "text_cfg": text_cfg}
