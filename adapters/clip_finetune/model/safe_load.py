"""What loading a user's weights file can meet, said plainly: a safetensors file that is truncated, corrupt or a
header bomb; a pickle that would run code (torch's own message then advises weights_only=False, the unsafe fix: it
is never shown); a file of weights that do not fit the architecture; a device this machine does not have."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ConfigError, ModelError
from ..inputs import require_file

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def check_safetensors(path: str | Path, what: str) -> None:
    """ModelError naming `what` unless `path` is a whole safetensors file (header and every tensor's bytes in the
    file; safetensors checks this without reading the tensors, and refuses a header over 100 MB)."""
    require_file(path, what)
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise ModelError(f"{what} {str(path)!r} is not a whole safetensors file ({e}): it is truncated or damaged; "
                         "save or download the model again") from None


def refused_pickle(path: str | Path, what: str, error: BaseException) -> ModelError:
    """The error for a torch.load(weights_only=True) that failed: the file is named, and what it is, never how to
    load it anyway."""
    found = _GLOBAL.search(str(error))
    if found is not None:
        holds = f"it is a pickle that refers to {found.group(1)}, which a weights file never needs"
    elif isinstance(error, pickle.UnpicklingError | EOFError):
        holds = "it is not a weights file torch can read without running code (or it is truncated)"
    else:
        holds = "it is not a torch weights file (or it is truncated)"
    return ModelError(f"{what} {str(path)!r} will not be loaded: {holds}. Unpickling a file can run code, so only "
                      "plain tensors are read; give a safetensors file, a saved model folder, or a file this tool "
                      "wrote")


def is_pickle_refusal(error: BaseException) -> bool:
    """True for the errors torch.load(weights_only=True) raises on a file it will not or cannot unpickle."""
    return isinstance(error, pickle.UnpicklingError | EOFError) or "weights_only" in str(error)


def weights_mismatch(path: str | Path, error: RuntimeError, architecture: str) -> ModelError:
    """The error for weights that do not fit the architecture (load_state_dict's size or key mismatch)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = "; ".join(lines[1:3] or lines[:1])[:300]
    return ModelError(f"the weights in {str(path)!r} do not fit {architecture} ({detail}); they come from another "
                      "model: give the weights and the architecture of the same model")


def check_device(device: torch.device) -> torch.device:
    """`device` when this machine has it; ConfigError naming what it has otherwise."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            has = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
            raise ConfigError(f"device: {str(device)!r} is not available: this machine has {has}; set device to "
                              f"{'cuda:0' if count else 'cpu'} or null (automatic)")
    elif device.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if device.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise ConfigError(f"device: {device.type!r} is not available on this machine; set device to cpu or null "
                              "(automatic)")
    elif device.type != "cpu":
        raise ConfigError(f"device: {str(device)!r} cannot run a model here; use cpu, cuda, cuda:N, mps or null "
                          "(automatic)")
    return device


def check_tokenizer_files(folder: Path, tokenizer_name: str | None) -> None:
    """A saved model whose text goes through a Hugging Face tokenizer must hold its files: stock open_clip and
    load_artifact read them from the folder (models saved before they were saved for SigLIP lack them)."""
    if tokenizer_name and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(
            f"{str(folder)!r} has no tokenizer files (tokenizer.json, tokenizer_config.json) for its Hugging Face "
            f"tokenizer {tokenizer_name!r}; copy that tokenizer's files into the folder (transformers' "
            "AutoTokenizer.from_pretrained(NAME).save_pretrained(FOLDER)), or save the model again"
        )
