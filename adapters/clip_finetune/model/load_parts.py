"""What building a configured model settles before and around open_clip: the model section a caller gives
(or the one of a whole configuration), the preprocessing a config JSON or a family of tags sets, whether a
weights file is OpenAI's, that a pretrained tag's weights can be had, and the embedding size the model has
(derived here, at load time: validating a configuration reads no architecture file)."""

from __future__ import annotations

import contextlib
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..architecture import architecture_preprocess
from ..errors import ConfigError
from ..sections import ModelSection
from .hub import weights_available


def model_request(model: Any, device: Any, seed: int | None) -> tuple[ModelSection, Any, int]:
    """(section, device, seed) of load_model's arguments: `model` is the model section, or a whole configuration
    (scripts and tests pass one) whose model section, device and seed are taken where not given."""
    if isinstance(model, ModelSection):
        return model, device, 0 if seed is None else seed
    return model.model, device or model.device, model.seed if seed is None else seed


def check_embeddings_size(embeddings_size: int | None, model_name: str, embed_dim: int) -> None:
    """ConfigError when a configured embeddings_size (None: follow the model) contradicts the model's."""
    if embeddings_size is not None and embeddings_size != embed_dim:
        raise ConfigError(f"embeddings_size: {embeddings_size} contradicts {model_name!r}, whose "
                          f"embeddings have {embed_dim} dimensions; remove the key or set it to {embed_dim}")


def preprocess_kwargs(model_name: str, name: str, pretrained: str | None) -> dict[str, Any]:
    """create_model_and_transforms' image_* overrides: the preprocessing a config JSON or the architecture's
    family of tags sets (SigLIP: mean and std 0.5, 'squash'), which open_clip applies for a pretrained tag only."""
    pp = architecture_preprocess(model_name if model_name.endswith(".json") else name, pretrained)
    return {f"image_{k}": v for k, v in pp.items()}


def is_openai_weights_file(path: str) -> bool:
    """A local file of OpenAI's CLIP weights (trained with QuickGELU): named for them ('...openai...'), or a
    TorchScript archive, the form OpenAI released them in (ViT-B-32.pt; a zip holding constants.pkl, which a
    plain torch.save zip never has)."""
    file = Path(path).expanduser()
    if not file.is_file():
        return False
    if "openai" in file.name.lower():
        return True
    try:
        with zipfile.ZipFile(file) as z:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def weights_for(name: str, pretrained: str | None) -> contextlib.AbstractContextManager:
    """Fail at once when a pretrained tag's weights can be neither found nor downloaded (model/hub.py)."""
    if not pretrained or Path(pretrained).expanduser().exists():
        return contextlib.nullcontext()
    return weights_available(name, pretrained)


class _DropBuiltInConfigLine(logging.Filter):
    """open_clip logs "Loaded built-in NAME model config" for an architecture this package registered from a
    JSON file: not built in. Our own log line says where the architecture came from."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Loaded built-in ")


@contextlib.contextmanager
def quiet_config_log(model_name: str) -> Iterator[None]:
    if not model_name.endswith(".json"):
        yield
        return
    root, drop = logging.getLogger(), _DropBuiltInConfigLine()  # open_clip logs through the root logger
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
