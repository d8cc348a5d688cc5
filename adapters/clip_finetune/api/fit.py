"""fit(): start a fine-tuning run in the runs folder (run_folder.py), in a background worker (worker.py) or in
this process, and return its Run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import build_config
from ..data.images import to_rgb
from ..data.pairs import CaptionPair
from ..errors import ConfigError, DataError, at_boundary
from .run import Run
from .run_folder import (
    DATA_DIR,
    LOG_FORMAT,
    LOG_NAME,
    REQUEST_NAME,
    RunError,
    check_run_name,
    create_run,
    new_run_name,
    now,
    process_identity,
    runs_root,
    update_state,
    write_json,
)
from .worker import execute

log = logging.getLogger(__name__)

PairLike = CaptionPair | tuple[Any, str] | list[Any]
DataLike = str | os.PathLike | Sequence[PairLike]
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding adapters/, for the worker's sys.path
_PACKAGE = __package__.rpartition(".")[0]  # adapters.clip_finetune


@at_boundary
def fit(
    model: str | os.PathLike,
    train_data: DataLike,
    eval_data: DataLike | None = None,
    run_name: str | None = None,
    *,
    test_data: DataLike | None = None,
    retention: DataLike | None = None,
    wait: bool = False,
    runs_dir: str | os.PathLike | None = None,
    **hyperparameters: Any,
) -> Run:
    """Start a fine-tuning run and return it; with `wait=True` train in this process and return when done.

    model: an open_clip architecture name ('ViT-B-32'), a model-config JSON, or a saved model folder.
    train_data / eval_data / test_data: a path (Dataloop download, folder of subsets or of classes, CSV/TSV/JSONL)
    or a list of (image path or PIL image, caption) pairs; one PIL image object given with several captions is
    one image. eval_data picks the best epoch: without it, a download's 'validation' subset, else a held-out part
    of train_data. test_data (else a download's 'test' subset) is scored once at the end: the result's 'after'.
    retention: what the base model knows and must not lose (same forms; else a download's 'retention' subset):
    scored before and after, and auto WiSE-FT keeps it within retention_tolerance (docs/retention.md).
    hyperparameters: FinetuneConfig fields, validated before anything starts (ConfigError, one line per field).
    In the background (default) a worker process the caller need not manage trains; a foreground run that
    fails raises after recording the failure.
    """
    if train_data is None:  # checked here: the background worker would die on it after the run was made
        raise DataError("train_data: required; give a path (a Dataloop download, a folder, a CSV/TSV/JSONL table) "
                        "or a list of (image, caption) pairs")
    cfg = build_config(_model_layer(model, hyperparameters), hyperparameters)
    specs = {"train_data": _check_data(train_data, "train_data"), "eval_data": _check_data(eval_data, "eval_data"),
             "test_data": _check_data(test_data, "test_data"), "retention_data": _check_data(retention, "retention")}
    root = runs_root(runs_dir)
    name = check_run_name(run_name) if run_name is not None else new_run_name()
    request: dict[str, Any] = {"config": cfg.model_dump(mode="json"), **dict.fromkeys(specs)}
    run_dir = create_run(root, name, request)
    try:
        for key, spec in specs.items():
            request[key] = _materialise(spec, run_dir, key.removesuffix("_data"))
        write_json(run_dir / REQUEST_NAME, request)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing started: leave no half-made run behind
        raise
    if wait:
        with _log_to(run_dir / LOG_NAME):
            execute(run_dir)
        return Run(run_dir)
    try:
        process = _spawn(run_dir)
    except OSError as e:
        update_state(run_dir, status="failed", error=f"cannot start the worker: {e}",
                          details=f"failed: cannot start the worker: {e}", finished_at=now())
        raise RunError(f"run {name!r}: cannot start the worker process ({e})") from e
    return Run(run_dir, process)


def _model_layer(model: str | os.PathLike, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The config keys `model` stands for (a saved model folder is its architecture AND its weights).

    Paths become absolute, so the worker reads the same files whatever its working folder.
    """
    if "model_name" in hyperparameters:
        raise ConfigError("model_name: give the model as fit(model=...), not as a hyperparameter")
    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model).strip():
        raise ConfigError(f"model: expected an open_clip architecture name ('ViT-B-32'), a model-config JSON or a "
                          f"saved model folder (got {model!r:.80})")
    pretrained = hyperparameters.get("pretrained")
    if isinstance(pretrained, str) and Path(pretrained).expanduser().exists():
        hyperparameters["pretrained"] = str(Path(pretrained).expanduser().resolve())
    text = os.fspath(model)
    path = Path(text).expanduser()
    if (path / "open_clip_config.json").is_file():
        if "pretrained" in hyperparameters:
            raise ConfigError(f"pretrained: model {text!r} is a saved model folder, which brings its own "
                              "weights; remove pretrained")
        folder = path.resolve()
        return {"model_name": str(folder / "open_clip_config.json"), "pretrained": str(folder)}
    return {"model_name": str(path.resolve()) if text.endswith(".json") else text}


def _check_data(data: DataLike | None, what: str) -> str | list[tuple[Any, str]] | None:
    """A path as an absolute string, or the pairs as (image, caption) tuples; wrong shapes fail now."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        if "\x00" in os.fspath(data):  # no file system takes it (the run itself reports a missing path)
            raise DataError(f"{what} {os.fspath(data)!r} is not a usable path (it holds a NUL character)")
        return str(Path(data).expanduser().resolve())
    if not isinstance(data, Sequence):
        raise DataError(f"{what}: expected a path or a list of (image, caption) pairs (got {type(data).__name__})")
    pairs = []
    for i, pair in enumerate(data):
        image, caption = (pair.image, pair.caption) if isinstance(pair, CaptionPair) else _unpack(pair, what, i)
        if not isinstance(image, (str, os.PathLike, Image.Image)) or (
                not isinstance(image, Image.Image) and "\x00" in os.fspath(image)):
            raise DataError(f"{what}[{i}]: the image must be a path or a PIL image (got {image!r:.80})")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{what}[{i}]: the caption must be a non-empty string (got {caption!r})")
        pairs.append((image, caption))
    if not pairs:
        raise DataError(f"{what}: the list of pairs is empty")
    return pairs


def _unpack(pair: Any, what: str, i: int) -> tuple[Any, Any]:
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
        return pair[0], pair[1]
    raise DataError(f"{what}[{i}]: expected an (image, caption) pair (got {pair!r:.80})")


def _materialise(spec: str | list[tuple[Any, str]] | None, run_dir: Path, split: str) -> str | None:
    """In-memory pairs become data/<split>.jsonl (+ one PNG per PIL image object) that the worker reads."""
    if spec is None or isinstance(spec, str):
        return spec
    folder = run_dir / DATA_DIR
    (folder / split).mkdir(parents=True, exist_ok=True)
    table = folder / f"{split}.jsonl"
    written: dict[int, Path] = {}  # id(PIL image) -> its PNG: an image given with 3 captions is 1 image, not 3
    with table.open("w", encoding="utf-8") as f:
        for i, (image, caption) in enumerate(spec):
            if isinstance(image, Image.Image):
                path = written.get(id(image))  # the objects live in `spec` throughout: ids are not reused
                if path is None:
                    path = written[id(image)] = folder / split / f"{i:06d}.png"
                    to_rgb(image).save(path)  # PNG: lossless, the worker decodes the very same pixels
            else:
                path = Path(image).expanduser().resolve()
            f.write(json.dumps({"id": f"{split}[{i}]", "image": str(path), "caption": caption}) + "\n")
    return str(table)


def _spawn(run_dir: Path) -> subprocess.Popen:
    """Start the worker in its own session (Ctrl-C in the caller's terminal does not stop it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    # -c, not -m: importing the package (api/__init__) imports the worker module first, and `python -m` of a module
    # already imported warns (a RuntimeWarning from <frozen runpy> at the top of every run's log)
    start = f"from {__package__}.worker import run; run()"
    cmd = [sys.executable, "-c", start, run_dir.name, "--runs-dir", str(run_dir.parent)]
    with open(run_dir / LOG_NAME, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    # the worker records itself too; this covers a worker that dies before it gets that far
    update_state(run_dir, only_if=lambda s: s["pid"] is None, **process_identity(proc.pid))
    return proc


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send this package's log (INFO and up) to the run's log file while a foreground run trains."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package_log = logging.getLogger(_PACKAGE)
    old_level = package_log.level
    if package_log.getEffectiveLevel() > logging.INFO:
        package_log.setLevel(logging.INFO)
    package_log.addHandler(handler)
    try:
        yield
    finally:
        package_log.removeHandler(handler)
        package_log.setLevel(old_level)
        handler.close()
