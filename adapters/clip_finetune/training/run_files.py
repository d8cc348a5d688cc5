"""What a run leaves in its model folder besides the model: the per-query evaluation, the unmixed best weights a
WiSE-FT run keeps until its checkpoint goes, and what a failed or fresh start must clear (a model written before
the first checkpoint, an earlier model's ONNX towers)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from safetensors.torch import load_file

from ..files import atomic_write
from ..model.card import CARD_NAME
from ..model.clip import FINETUNE_CONFIG_NAME, METRICS_NAME
from ..model.safe_load import check_safetensors
from ..model.weights import cpu_state_from_artifact
from ..retrieval.evaluation_result import PER_QUERY_NAME, EvaluationResult
from ..retrieval.failures import BEFORE_NAME, FAILURES_NAME, write_failures

if TYPE_CHECKING:
    from .state import RunState

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"  # export_onnx: the ONNX towers go to this folder inside the saved model
UNMIXED_BEST_NAME = ".best-unmixed.safetensors"  # a WiSE-FT run's best weights while its mix is being written


def model_stamp(out: Path | None) -> tuple[int, int] | None:
    """(inode, mtime) of the weights in `out`: every save replaces the file (atomic_write), so a changed stamp
    means this run wrote them."""
    try:
        st = (out / HF_SAFE_WEIGHTS_NAME).stat() if out is not None else None
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns) if st is not None else None


def drop_unfinished_model(run: RunState, out: Path, stamp: tuple[int, int] | None) -> None:
    """A run that fails before its first checkpoint (the disk filled while writing it, say) leaves the base model it
    wrote, or half of it: without a checkpoint beside it, a later run and `check_output_folder` would take it for a
    finished model. This run's model files go; with a checkpoint they stay (--resume continues from both). The
    base model's per-query file goes even when no model was written: a fresh start wrote it (any earlier one was
    cleared), and it would be the one file that makes the folder need --overwrite."""
    if run.checkpoint is not None and run.checkpoint.is_file():
        return
    for name in (BEFORE_NAME, FAILURES_NAME):
        (out / name).unlink(missing_ok=True)
    if model_stamp(out) == stamp:
        return
    for name in (HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, FINETUNE_CONFIG_NAME, METRICS_NAME, CARD_NAME, PER_QUERY_NAME):
        (out / name).unlink(missing_ok=True)
    log.warning("the run stopped before its first checkpoint: removed the unfinished model it had written to %s", out)


def write_per_query(evaluation: EvaluationResult | None, out: Path | None, base: bool = False,
                    gallery: bool = False) -> None:
    """The evaluation whose metrics the model folder's metrics.json reports, per query, next to it. `base`: the
    base model's on the split the final figures come from, kept as BEFORE_NAME (the failure gallery's 'before');
    `gallery`: the run's end, then the failure gallery of the two is written (failures.json)."""
    if evaluation is not None and out is not None:
        evaluation.write(out / (BEFORE_NAME if base else PER_QUERY_NAME))
    if gallery and out is not None:
        write_failures(out)


def keep_unmixed_best(out: Path) -> None:
    """Keep the best weights (the artifact in `out` until the mix replaces it) as UNMIXED_BEST_NAME, so a run
    stopped after the mix was written (during the ONNX export, say) resumes from them and mixes once, not twice.
    A hard link costs nothing (the artifact's rename leaves the linked file whole); a copy where links fail. A
    resumed run finds it already kept."""
    kept, artifact = out / UNMIXED_BEST_NAME, out / HF_SAFE_WEIGHTS_NAME
    if kept.is_file() or not artifact.is_file():
        return
    try:
        os.link(artifact, kept)
    except OSError:
        atomic_write(kept, lambda p: shutil.copyfile(artifact, p))


def best_so_far(out: Path | None) -> dict[str, torch.Tensor] | None:
    """The best weights a resumed run had so far: the unmixed ones a WiSE-FT run kept, else the artifact's."""
    kept = out / UNMIXED_BEST_NAME if out is not None else None
    if kept is not None and kept.is_file():
        check_safetensors(kept, "the best weights before the WiSE-FT mix")
        return load_file(str(kept))
    return cpu_state_from_artifact(out)


def clear_previous_run(out: Path) -> None:
    """A fresh start in `out` (an --overwrite, or a run stopped before its first checkpoint): what an earlier
    run left that the new model would not replace goes first: its ONNX towers (they would disagree with the new
    weights) and its kept unmixed weights."""
    for name in (UNMIXED_BEST_NAME, BEFORE_NAME, FAILURES_NAME):  # the last two: the gallery of the earlier model
        (out / name).unlink(missing_ok=True)
    if (out / ONNX_DIR).is_dir() and not (out / ONNX_DIR).is_symlink():
        log.warning("%s: removing the previous model's ONNX export (it belongs to the weights being replaced)",
                    out / ONNX_DIR)
        shutil.rmtree(out / ONNX_DIR)
