"""Which open_clip architecture a configuration names: a name (the reference app's 'ViT-B/32' spelling mapped to
open_clip's), a model-config JSON, or the config inside a saved model folder; read bounded, checked for the keys
open_clip needs."""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelError, Setting
from .inputs import MAX_CONFIG_BYTES, Unreadable, file_problem, read_json


def normalize_model_name(name: str) -> str:
    """Map the reference app's OpenAI-style spelling to open_clip's: 'ViT-B/32' -> 'ViT-B-32',
    'ViT-L/14@336px' -> 'ViT-L-14-336'. Paths to a model-config JSON are returned unchanged."""
    if name.endswith(".json"):
        return name
    name = re.sub(r"@(\d+)px$", r"-\1", name.strip())
    return name.replace("/", "-")


def architecture_config(model_name: str) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) of a name or a config-JSON path."""
    if model_name.endswith(".json"):
        cfg = _read_config_json(Path(model_name).expanduser(), "model_name: model-config file")
        return model_cfg_of(cfg.get("model_cfg", cfg), f"model_name: {model_name!r}")  # an artifact's config too
    if "open_clip" in sys.modules or ":" in model_name:  # its registry (architectures added at run time) or a
        try:  # hf-hub:/local-dir: name, which only open_clip resolves
            import open_clip
        except Exception as e:  # a broken install (a missing shared library of torch, a version clash): said once
            raise ModelError(f"model_name {model_name!r} cannot be checked: open_clip does not import "
                             f"({type(e).__name__}: {str(e)[:200]}); reinstall it (pip install --force-reinstall "
                             "open_clip_torch torch); `clip-finetune doctor` lists what is broken") from e

        cfg, known = open_clip.get_model_config(model_name), open_clip.list_models
    else:
        cfg, known = _bundled_config(model_name), _bundled_names
    if cfg is None:
        known = known()
        close = difflib.get_close_matches(model_name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see open_clip.list_models()"
        raise ConfigError(f"model_name: unknown architecture {model_name!r}{hint}")
    return cfg


def hf_tokenizer_name(model_cfg: dict[str, Any]) -> str | None:
    """The Hugging Face tokenizer (hub id or folder) of a model that has one (a transformer text tower, or
    open_clip's own text tower fed by an HF tokenizer, as SigLIP's), else None."""
    return (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name") or None


def _bundled_folder() -> Path | None:
    """open_clip's model_configs folder, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) / "model_configs" if locations else None


def _bundled_names() -> list[str]:
    folder = _bundled_folder()
    return sorted(p.stem for p in folder.glob("*.json")) if folder is not None else []


def _bundled_config(model_name: str) -> dict[str, Any] | None:
    """The architecture open_clip ships as model_configs/<name>.json (what open_clip.get_model_config returns
    for it: files without embed_dim, vision_cfg and text_cfg are not architectures), else None."""
    folder = _bundled_folder()
    if folder is None or Path(model_name).name != model_name or not (folder / f"{model_name}.json").is_file():
        return None
    cfg = json.loads((folder / f"{model_name}.json").read_text())
    return cfg if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")) else None


def check_pretrained_tag(model_name: str, pretrained: str | None) -> None:
    """ConfigError for a custom architecture (a model-config JSON) left on a pretrained tag ('openai'): open_clip
    has no such weights for it, and would only say so when the run builds the model, in the background."""
    if not model_name.endswith(".json") or not pretrained or pretrained.startswith("hf-hub:"):
        return
    looks_like_path = any(c in pretrained for c in "/\\") or Path(pretrained).suffix or Path(pretrained).exists()
    if looks_like_path:  # weights made for this architecture (a file, or a saved model folder)
        return
    # the JSON is registered in open_clip under its file name: a tag open_clip knows for that name is real weights
    # (a tag registered at run time needs open_clip imported; a built-in name's tags are left to open_clip)
    stem = Path(model_name).stem
    if stem in _bundled_names():
        return
    if "open_clip" in sys.modules:
        from open_clip.pretrained import list_pretrained_tags_by_model

        if pretrained in list_pretrained_tags_by_model(stem):
            return
    raise ConfigError(f"pretrained: {pretrained!r} is an open_clip pretrained tag, for its named architectures; the "
                      f"custom architecture {model_name!r} has no such weights: set {{pretrained}} (random init) or "
                      "the path of weights made for it", advice={"pretrained": Setting(
                          "pretrained", "null", plain="pretrained=None (null in a JSON configuration)")})


def _artifact_model_config(pretrained: str | None) -> dict[str, Any] | None:
    """If `pretrained` names a saved artifact folder, the architecture stored in it."""
    if not pretrained:
        return None
    cfg_file = Path(pretrained).expanduser() / "open_clip_config.json"
    problem = file_problem(cfg_file)
    if problem is not None and problem[0] in ("missing", "unusable name"):
        return None  # not a saved model folder: a pretrained tag or a weights file
    cfg = _read_config_json(cfg_file, "pretrained: the saved model's")
    return model_cfg_of(cfg.get("model_cfg"), f"pretrained: {str(cfg_file)!r}")


def _read_config_json(path: Path, what: str) -> dict[str, Any]:
    """A small JSON object file (size, depth and encoding bounded); ConfigError naming `what` and the file."""
    try:
        data = read_json(path, MAX_CONFIG_BYTES)
    except Unreadable as e:
        raise ConfigError(f"{what} {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} holds JSON {type(data).__name__}, not an object")
    return data


def model_cfg_of(cfg: Any, what: str) -> dict[str, Any]:
    """`cfg` when it looks like an open_clip model config (embed_dim, vision_cfg, text_cfg); ConfigError else."""
    if not isinstance(cfg, dict) or "model_cfg" in cfg:
        raise ConfigError(f"{what} has no model_cfg object; it is not an open_clip model config or a saved "
                          "model's open_clip_config.json")
    embed_dim = cfg.get("embed_dim")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ConfigError(f"{what} has no positive integer 'embed_dim' (got {embed_dim!r}); not an open_clip "
                          "model config")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"{what} has no {key} object; not an open_clip model config")
    return cfg


# open_clip's PreprocessCfg keys a model config file or a family of pretrained tags may set, and their values
_PREPROCESS_CHOICES = {"interpolation": ("bicubic", "bilinear", "nearest"),
                       "resize_mode": ("shortest", "longest", "squash")}


def architecture_preprocess(model_name: str, pretrained: str | None) -> dict[str, Any]:
    """The image preprocessing (mean, std, interpolation, resize_mode) a model built from `model_name` without a
    pretrained tag must use, or {} for open_clip's defaults.

    open_clip takes it from the pretrained tag only (e.g. SigLIP's webli: mean and std 0.5, 'squash'), so a
    config JSON, a weights file or random init would get OpenAI's. A config JSON in the saved model's format
    brings its own `preprocess_cfg`; a built-in name takes what all of its tags agree on."""
    if model_name.endswith(".json"):
        cfg = _read_config_json(Path(model_name).expanduser(), "model_name: model-config file")
        return _checked_preprocess(cfg.get("preprocess_cfg"), f"model_name: {model_name!r}")
    import open_clip

    if pretrained and open_clip.get_pretrained_cfg(model_name, pretrained):
        return {}  # open_clip applies the tag's own
    tags = [open_clip.get_pretrained_cfg(model_name, t) for t in open_clip.list_pretrained_tags_by_model(model_name)]
    agreed = {}
    for key in ("mean", "std", *_PREPROCESS_CHOICES):
        values = {json.dumps(t.get(key)) for t in tags}
        if tags and len(values) == 1 and tags[0].get(key) is not None:
            agreed[key] = tags[0][key]
    return agreed


def _checked_preprocess(pp: Any, what: str) -> dict[str, Any]:
    if pp is None:
        return {}
    if not isinstance(pp, dict):
        raise ConfigError(f"{what}: preprocess_cfg must be an object (mean, std, interpolation, resize_mode)")
    out = {}
    for key in ("mean", "std"):
        value = pp.get(key)
        if value is None:
            continue
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{what}: preprocess_cfg.{key} must be 3 numbers, one per RGB channel (got {value!r})")
        out[key] = tuple(float(v) for v in value)
    for key, choices in _PREPROCESS_CHOICES.items():
        if pp.get(key) is not None:
            if pp[key] not in choices:
                raise ConfigError(f"{what}: preprocess_cfg.{key} {pp[key]!r} is not one of {', '.join(choices)}")
            out[key] = pp[key]
    return out
