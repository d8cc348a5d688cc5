"""Fine-tune CLIP (open_clip) for text-to-image search: `clip-finetune` CLI, Python API, Dataloop adapter.

The Python API (api/) is importable from here; it is loaded on first use, so `import adapters.clip_finetune`
stays light (no torch, no open_clip).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Run", "encode", "export_hf", "fit", "get_model", "get_run", "list_runs", "push_to_hub"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
