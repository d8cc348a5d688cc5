"""Share a saved model: push it to the Hugging Face Hub, or export it for transformers (torch is imported on call)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError


def _folder(model: str | Path, name: str = "model") -> Path:
    if not isinstance(model, (str, Path)) or not str(model):
        raise DataError(f"{name} must be a saved model folder (a path), got {model!r}")
    return Path(model)


def push_to_hub(model: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload the saved model folder `model` (weights, config, model card, metrics) to the Hub repository
    `repo_id` (OWNER/NAME), creating it if needed; the token comes from HF_TOKEN. Returns the commit's URL."""
    from ..model.hub_push import push_to_hub as push

    return push(_folder(model), repo_id, private=private)


def export_hf(model: str | Path, out: str | Path) -> Path:
    """Write `out`, a transformers CLIPModel folder with the same embeddings as the saved model `model`."""
    from ..model.hf_export import export_hf as export

    return export(_folder(model), _folder(out, "out"))
