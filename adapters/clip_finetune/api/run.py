"""The Python API: fit() starts a run, Run watches it, get_model()/encode() embed with the result.

    from adapters.clip_finetune import fit, get_run, get_model, encode
    run = fit(model="ViT-B-32", train_data="pairs.csv", eval_data="val.csv", num_epochs=3)
    for line in run.stream_logs(): print(line)
    vectors = encode(get_model(run, "clip-text"), ["a red dress"])

Runs live in the runs folder (runs.py), so get_run(name) finds them after a restart. Heavy modules (torch,
open_clip) are imported only where a model is built: starting and watching a run stays light.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from ..config import build_config
from ..data.pairs import CaptionPair
from ..errors import ConfigError, DataError
from ..retrieval.fusion import top_k_scores
from . import run_folder as runs
from .run_folder import RunError

if TYPE_CHECKING:
    from ..model.clip import ClipModel

log = logging.getLogger(__name__)

PairLike = CaptionPair | tuple[Any, str] | list[Any]
DataLike = str | os.PathLike | Sequence[PairLike]
TOWERS = ("clip-text", "clip-vision")
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding adapters/, for the worker's sys.path


# --- fit ------------------------------------------------------------------------------------------------------


def fit(
    model: str | os.PathLike,
    train_data: DataLike,
    eval_data: DataLike | None = None,
    run_name: str | None = None,
    *,
    wait: bool = False,
    runs_dir: str | os.PathLike | None = None,
    **hyperparameters: Any,
) -> Run:
    """Start a fine-tuning run and return it; with `wait=True` train in this process and return when done.

    model: an open_clip architecture name ('ViT-B-32'), a model-config JSON, or a saved model folder.
    train_data / eval_data: a path (Dataloop download, folder of subsets, CSV/TSV/JSONL) or a list of
    (image path or PIL image, caption) pairs. Without eval_data, a download's 'validation' subset evaluates.
    hyperparameters: FinetuneConfig fields, validated before anything starts (ConfigError, one line per field).
    In the background (default) a worker process the caller need not manage trains; a foreground run that
    fails raises after recording the failure.
    """
    cfg = build_config(_model_layer(model, hyperparameters), hyperparameters)
    train_spec, eval_spec = _check_data(train_data, "train_data"), _check_data(eval_data, "eval_data")
    root = runs.runs_root(runs_dir)
    name = runs.check_run_name(run_name) if run_name is not None else runs.new_run_name()
    request = {"config": cfg.model_dump(mode="json"), "train_data": None, "eval_data": None}
    run_dir = runs.create_run(root, name, request)
    try:
        request["train_data"] = _materialise(train_spec, run_dir, "train")
        request["eval_data"] = _materialise(eval_spec, run_dir, "eval")
        runs.write_json_atomic(run_dir / runs.REQUEST_NAME, request)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing started: leave no half-made run behind
        raise
    if wait:
        with _log_to(run_dir / runs.LOG_NAME):
            runs.execute(run_dir)
        return Run(run_dir)
    try:
        process = _spawn(run_dir)
    except OSError as e:
        runs.update_state(run_dir, status="failed", error=f"cannot start the worker: {e}",
                          details=f"failed: cannot start the worker: {e}", finished_at=runs.now())
        raise RunError(f"run {name!r}: cannot start the worker process ({e})") from e
    return Run(run_dir, process)


def _model_layer(model: str | os.PathLike, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The config keys `model` stands for (a saved model folder is its architecture AND its weights).

    Paths become absolute, so the worker reads the same files whatever its working folder.
    """
    if "model_name" in hyperparameters:
        raise ConfigError("model_name: give the model as fit(model=...), not as a hyperparameter")
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
        return str(Path(data).expanduser().resolve())
    if not isinstance(data, Sequence):
        raise DataError(f"{what}: expected a path or a list of (image, caption) pairs (got {type(data).__name__})")
    pairs = []
    for i, pair in enumerate(data):
        image, caption = (pair.image, pair.caption) if isinstance(pair, CaptionPair) else _unpack(pair, what, i)
        if not isinstance(image, (str, os.PathLike, Image.Image)):
            raise DataError(f"{what}[{i}]: the image must be a path or a PIL image (got {type(image).__name__})")
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
    """In-memory pairs become data/<split>.jsonl (+ PNGs for PIL images) that the worker reads."""
    if spec is None or isinstance(spec, str):
        return spec
    folder = run_dir / runs.DATA_DIR
    (folder / split).mkdir(parents=True, exist_ok=True)
    table = folder / f"{split}.jsonl"
    with table.open("w", encoding="utf-8") as f:
        for i, (image, caption) in enumerate(spec):
            if isinstance(image, Image.Image):
                path = folder / split / f"{i:06d}.png"
                _as_rgb(image).save(path)  # PNG: lossless, the worker decodes the very same pixels
            else:
                path = Path(image).expanduser().resolve()
            f.write(json.dumps({"id": f"{split}[{i}]", "image": str(path), "caption": caption}) + "\n")
    return str(table)


def _spawn(run_dir: Path) -> subprocess.Popen:
    """Start the worker in its own session (Ctrl-C in the caller's terminal does not stop it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", f"{__package__}.run_folder", run_dir.name, "--runs-dir", str(run_dir.parent)]
    with open(run_dir / runs.LOG_NAME, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    # the worker records itself too; this covers a worker that dies before it gets that far
    runs.update_state(run_dir, only_if=lambda s: s["pid"] is None, **runs.process_identity(proc.pid))
    return proc


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send this package's log (INFO and up) to the run's log file while a foreground run trains."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(runs.LOG_FORMAT))
    package_log = logging.getLogger(__package__.rpartition(".")[0])
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


# --- runs -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One evaluation caption and the top-k images it retrieved before and after fine-tuning."""

    query: str
    image: str  # the image the caption describes
    before: list[tuple[str, float]]  # (image path, cosine similarity), best first
    after: list[tuple[str, float]]

    @property
    def hit_before(self) -> bool:
        return any(path == self.image for path, _ in self.before)

    @property
    def hit_after(self) -> bool:
        return any(path == self.image for path, _ in self.after)


class Run:
    """A fine-tuning run in the runs folder; every method reads the folder, so any process may ask."""

    def __init__(self, path: str | os.PathLike, process: subprocess.Popen | None = None) -> None:
        self.path = Path(path)
        self._process = process  # only in the process that spawned the worker: polled to reap it

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> dict[str, Any]:
        """The validated hyperparameters of the run."""
        return runs.read_json(self.path / runs.REQUEST_NAME)["config"]

    def __repr__(self) -> str:
        return f"Run(name={self.name!r}, status={self.status()['status']!r})"

    def status(self) -> dict[str, Any]:
        """{'status': created|started|finished|failed, 'details', 'progress': {'epoch', 'num_epochs'},
        'error', 'pid', timestamps}. A worker that died unannounced makes it 'failed' ("worker died")."""
        if self._process is not None:
            self._process.poll()  # reaps our own exited child, so it does not linger as a zombie
        return runs.refresh_state(self.path)

    def logs(self) -> str:
        """The run's log so far."""
        return (self.path / runs.LOG_NAME).read_text(encoding="utf-8", errors="replace")

    def stream_logs(self, poll_interval: float = 0.25, timeout: float | None = None) -> Iterator[str]:
        """Yield log lines (no newline) as they are written, until the run has finished or failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending, offset = "", 0
        while True:
            # checked BEFORE reading: the worker logs its last line before it writes the final state
            done = self.status()["status"] in runs.TERMINAL
            with open(self.path / runs.LOG_NAME, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *lines, pending = (pending + decoder.decode(chunk, final=done)).split("\n")
            yield from lines
            if done:
                if pending:
                    yield pending
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.name!r} still {self.status()['status']} after {timeout} s")
            time.sleep(poll_interval)

    def wait(self, timeout: float | None = None, poll_interval: float = 0.5) -> dict[str, Any]:
        """Block until the run has finished or failed; returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.status())["status"] not in runs.TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.name!r} still {state['status']} after {timeout} s")
            time.sleep(poll_interval)
        return state

    def _require_finished(self, what: str) -> None:
        state = self.status()
        if state["status"] == "failed":
            raise RunError(f"run {self.name!r} failed ({state['error']}); it has no {what}; see run.logs()")
        if state["status"] != "finished":
            raise RunError(f"run {self.name!r} is {state['status']} ({state['details']}); its {what} is ready "
                           "when it has finished: run.wait() or run.stream_logs()")

    def metrics(self) -> dict[str, Any]:
        """{'before': {...}, 'after': {...}, 'best_epoch', 'metric', 'history'}; before/after hold both
        directions ('text_to_image/recall@1', 'image_to_text/mrr', ...); empty without evaluation data."""
        self._require_finished("metrics")
        return runs.read_json(self.path / runs.RESULT_NAME)

    def save_artifact(self, directory: str | os.PathLike) -> Path:
        """Copy the tuned model (an open_clip local-dir folder) to `directory`; returns it."""
        self._require_finished("model")
        return Path(shutil.copytree(self.path / runs.MODEL_DIR, Path(directory).expanduser(), dirs_exist_ok=True))

    @property
    def model_dir(self) -> Path:
        """The tuned model inside the run folder (get_model accepts the Run itself)."""
        self._require_finished("model")
        return self.path / runs.MODEL_DIR

    def example_results(self, k: int = 5) -> list[Example]:
        """For each evaluation caption, the top-k evaluation images before and after fine-tuning."""
        self._require_finished("example results")
        files = [self.path / runs.EXAMPLES_DIR / f"{when}.npz" for when in ("before", "after")]
        if not all(f.is_file() for f in files):
            raise RunError(f"run {self.name!r} had no evaluation data, so it has no example results")
        ranked = []
        for file in files:
            with np.load(file, allow_pickle=False) as d:
                images, captions, owner = d["images"].tolist(), d["captions"].tolist(), d["text_to_image"]
                idx, scores = top_k_scores(d["text_features"] @ d["image_features"].T, k)  # [n_texts, k]
            top = [[(images[i], float(s)) for i, s in zip(row_i, row_s, strict=True)]
                   for row_i, row_s in zip(idx, scores, strict=True)]
            ranked.append((captions, [images[o] for o in owner], top))
        (captions, targets, before), (_, _, after) = ranked
        return [Example(q, t, b, a) for q, t, b, a in zip(captions, targets, before, after, strict=True)]


def get_run(name: str, runs_dir: str | os.PathLike | None = None) -> Run:
    """Reconnect to the run called `name` in the runs folder (after a restart too)."""
    root = runs.runs_root(runs_dir)
    run_dir = root / runs.check_run_name(name)
    if not (run_dir / runs.STATE_NAME).is_file():
        known = [r.name for r in list_runs(root)]
        hint = f"runs there: {', '.join(known[-10:])}" if known else "it holds no runs"
        raise RunError(f"no run named {name!r} in {str(root)!r}; {hint} (set runs_dir or ${runs.RUNS_DIR_ENV})")
    return Run(run_dir)


def list_runs(runs_dir: str | os.PathLike | None = None) -> list[Run]:
    """Every run in the runs folder, oldest first."""
    root = runs.runs_root(runs_dir)
    folders = [d for d in root.iterdir() if (d / runs.STATE_NAME).is_file()] if root.is_dir() else []
    return sorted((Run(d) for d in folders), key=lambda r: (runs.read_state(r.path)["created_at"], r.name))


# --- inference -------------------------------------------------------------------------------------------------


@dataclass
class Encoder:
    """One tower of a saved model, ready for encode()."""

    clip: ClipModel
    tower: Literal["clip-text", "clip-vision"]

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim


def get_model(
    artifact: str | os.PathLike | Run, select_model: Literal["clip-text", "clip-vision"], device: str | None = None
) -> Encoder:
    """Load the text or the vision tower of a saved model folder (or of a finished Run)."""
    if select_model not in TOWERS:
        raise ConfigError(f"select_model: {select_model!r} is not a tower; use 'clip-text' (texts) or "
                          "'clip-vision' (images)")
    from ..model.clip import load_artifact

    folder = artifact.model_dir if isinstance(artifact, Run) else artifact
    return Encoder(load_artifact(folder, device), select_model)


def encode(model: Encoder, data: Sequence[Any] | str | Image.Image, batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 vectors [n, d], one row per text (clip-text) or image (path or PIL; clip-vision),
    in order. An image that cannot be decoded is an error (a skipped row would misalign the result)."""
    from ..retrieval.embed import encode_texts

    items = [data] if isinstance(data, (str, Image.Image)) else list(data)
    if model.tower == "clip-text":
        if not all(isinstance(t, str) for t in items):
            raise DataError("encode: a clip-text model encodes strings; use get_model(..., 'clip-vision') "
                            "for images")
        return encode_texts(model.clip, items, batch_size)
    out = np.zeros((len(items), model.embed_dim), np.float32)
    files = [i for i, x in enumerate(items) if not isinstance(x, Image.Image)]
    pil = [i for i, x in enumerate(items) if isinstance(x, Image.Image)]
    if files:
        out[files] = _encode_files(model.clip, [items[i] for i in files], batch_size)
    if pil:
        out[pil] = _encode_pil(model.clip, [items[i] for i in pil], batch_size)
    return out


def _encode_files(clip: ClipModel, paths: list[Any], batch_size: int) -> np.ndarray:
    """Image files through embed.encode_images, the very pipeline of `clip-finetune embed`."""
    from ..retrieval.embed import encode_images

    paths = [os.fspath(p) for p in paths]
    vectors, kept = encode_images(clip, paths, batch_size, progress=False)
    if len(kept) < len(paths):
        bad = sorted(set(range(len(paths))) - set(kept))
        raise DataError(f"encode: {len(bad)} of {len(paths)} images could not be decoded (e.g. {paths[bad[0]]!r}); "
                        "the log names each reason; remove or re-export them")
    return vectors


def _encode_pil(clip: ClipModel, images: list[Image.Image], batch_size: int) -> np.ndarray:
    import torch

    from ..retrieval.embed import autocast_for

    out = []
    clip.model.eval()
    with torch.inference_mode(), autocast_for(clip.device):
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([clip.preprocess(_as_rgb(im)) for im in images[start : start + batch_size]])
            out.append(clip.model.encode_image(pixels.to(clip.device), normalize=True).float().cpu().numpy())
    return np.concatenate(out)


def _as_rgb(image: Image.Image) -> Image.Image:
    """What load_image does after decoding (EXIF orientation, RGB, alpha onto white), so a PIL image and
    its file give the same vector."""
    from ..data.images import _to_rgb, _upright

    return _to_rgb(_upright(image))
