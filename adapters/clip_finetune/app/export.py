"""Export: a saved model as ONNX towers with their preprocessing settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def export(model_dir: str | Path, out: str | Path, opset: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Export the model in `model_dir` to `out`; returns the folder and its preprocess.json settings."""
    from ..model.onnx_export import export_onnx

    folder = export_onnx(model_dir, out, opset)
    return folder, json.loads((folder / "preprocess.json").read_text())
