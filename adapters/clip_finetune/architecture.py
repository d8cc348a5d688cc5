"""Which open_clip architecture a configuration names: a name (the reference app's 'ViT-B/32' spelling mapped to
open_clip's), a model-config JSON, or the config inside a saved model folder; read bounded, checked for the keys
open_clip needs."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError
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
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        known = open_clip.list_models()
        close = difflib.get_close_matches(model_name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see open_clip.list_models()"
        raise ConfigError(f"model_name: unknown architecture {model_name!r}{hint}")
    return cfg


def check_pretrained_tag(model_name: str, pretrained: str | None) -> None:
    """ConfigError for a custom architecture (a model-config JSON) left on a pretrained tag ('openai'): open_clip
    has no such weights for it, and would only say so when the run builds the model, in the background."""
    if not model_name.endswith(".json") or not pretrained or pretrained.startswith("hf-hub:"):
        return
    looks_like_path = any(c in pretrained for c in "/\\") or Path(pretrained).suffix or Path(pretrained).exists()
    if looks_like_path:  # weights made for this architecture (a file, or a saved model folder)
        return
    raise ConfigError(f"pretrained: {pretrained!r} is an open_clip pretrained tag, for its named architectures; the "
                      f"custom architecture {model_name!r} has no such weights: set pretrained=None (random init; "
                      "--set pretrained=null on the command line) or the path of weights made for it")


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
