"""The configuration as the command line reads and prints it: `--set key=value` pairs, a `--config` JSON file,
and the reference table `clip-finetune config --markdown` prints (docs/configuration.md is checked against it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig
from ..errors import ConfigError
from ..inputs import MAX_CONFIG_BYTES, Unreadable, read_json


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """Parse CLI `--set key=value` pairs; values are read as JSON when they parse, else as text."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:  # not JSON: the text itself
            out[key.strip()] = raw
        except RecursionError:
            raise ConfigError(f"--set {key.strip()}: the value is nested too deeply to be a hyperparameter") from None
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON configuration file (a dict of hyperparameters)."""
    p = Path(path)
    try:
        data = read_json(p, MAX_CONFIG_BYTES)  # a regular file, at most 1 MB, UTF-8, nested <= 100 levels
    except Unreadable as e:
        raise ConfigError(f"--config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {str(p)!r} must hold a JSON object of hyperparameters")
    return data


def markdown_reference() -> str:
    """The configuration reference table (docs/configuration.md is checked against it in the tests)."""
    rows = ["| key | default | description |", "|---|---|---|"]
    defaults = FinetuneConfig().model_dump(mode="json")
    for name, f in FinetuneConfig.model_fields.items():
        default = json.dumps(defaults[name]) if name != "embeddings_size" else "derived (512 for ViT-B-32)"
        rows.append(f"| `{name}` | `{default}` | {f.description} |")
    return "\n".join(rows) + "\n"

