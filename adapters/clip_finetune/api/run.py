"""Run: a fine-tuning run in the runs folder, watched from any process (also after a restart); get_run and
list_runs find them."""

from __future__ import annotations

import codecs
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ClipFinetuneError, at_boundary
from ..retrieval.ranking import top_k_by_dot
from ..retrieval.safe_npz import load_npz
from .run_folder import (
    EXAMPLES_DIR,
    LOG_NAME,
    MODEL_DIR,
    REQUEST_NAME,
    RESULT_NAME,
    RUNS_DIR_ENV,
    STATE_NAME,
    TERMINAL,
    RunError,
    check_run_name,
    read_json,
    read_state,
    refresh_state,
    runs_root,
)

log = logging.getLogger(__name__)
# the arrays worker.save_pair_embeddings writes (and "relevant", in runs since duplicate-aware evaluation)
EXAMPLE_ARRAYS = ("images", "image_features", "captions", "text_features", "text_to_image")


@dataclass(frozen=True)
class Example:
    """One evaluation caption and the top-k images it retrieved before and after fine-tuning."""

    query: str
    image: str  # the image the caption describes (the first, when several images share the caption)
    before: list[tuple[str, float]]  # (image path, cosine similarity), best first
    after: list[tuple[str, float]]
    relevant: tuple[str, ...] = ()  # every image the caption describes (duplicate-aware, docs/metrics.md)

    @property
    def hit_before(self) -> bool:
        return any(path in (self.image, *self.relevant) for path, _ in self.before)

    @property
    def hit_after(self) -> bool:
        return any(path in (self.image, *self.relevant) for path, _ in self.after)


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
        return read_json(self.path / REQUEST_NAME)["config"]

    def __repr__(self) -> str:
        return f"Run(name={self.name!r}, status={self.status()['status']!r})"

    @at_boundary
    def status(self) -> dict[str, Any]:
        """{'status': created|started|finished|failed, 'details', 'progress': {'epoch', 'num_epochs'},
        'error', 'pid', timestamps}. A worker that died unannounced makes it 'failed' ("worker died")."""
        if self._process is not None:
            self._process.poll()  # reaps our own exited child, so it does not linger as a zombie
        return refresh_state(self.path)

    @at_boundary
    def logs(self) -> str:
        """The run's log so far."""
        return (self.path / LOG_NAME).read_text(encoding="utf-8", errors="replace")

    def stream_logs(self, poll_interval: float = 0.25, timeout: float | None = None) -> Iterator[str]:
        """Yield log lines (no newline) as they are written, until the run has finished or failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending, offset = "", 0
        while True:
            # checked BEFORE reading: the worker logs its last line before it writes the final state
            done = self.status()["status"] in TERMINAL
            with open(self.path / LOG_NAME, "rb") as f:
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

    @at_boundary
    def wait(self, timeout: float | None = None, poll_interval: float = 0.5) -> dict[str, Any]:
        """Block until the run has finished or failed; returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.status())["status"] not in TERMINAL:
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

    @at_boundary
    def metrics(self) -> dict[str, Any]:
        """{'before': {...}, 'after': {...}, 'best_epoch', 'metric', 'history'}; before/after hold both
        directions ('text_to_image/recall@1', 'image_to_text/mrr', ...); empty without evaluation data."""
        self._require_finished("metrics")
        return read_json(self.path / RESULT_NAME)

    @at_boundary
    def save_artifact(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Copy the tuned model (an open_clip local-dir folder) to `directory`; returns it. A `directory` that holds
        a model or other files is refused unless `overwrite`."""
        self._require_finished("model")
        target = Path(directory).expanduser()
        source = (self.path / MODEL_DIR).resolve()
        where = target.resolve()
        if where == source or source in where.parents or where in source.parents:
            # copytree onto or into itself recurses, and over its run folder it would mix the run's files in
            raise RunError(f"save_artifact: {str(target)!r} is the run's own model folder, inside it or a folder "
                           "holding it; give a folder outside the run")
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
            what = "is a file" if not target.is_dir() else f"already holds {len(list(target.iterdir()))} files"
            raise RunError(f"save_artifact: {str(target)!r} {what}; give a new or empty folder, or overwrite=True")
        return Path(shutil.copytree(self.path / MODEL_DIR, target, dirs_exist_ok=True))

    @property
    def model_dir(self) -> Path:
        """The tuned model inside the run folder (get_model accepts the Run itself)."""
        self._require_finished("model")
        return self.path / MODEL_DIR

    @at_boundary
    def example_results(self, k: int = 5) -> list[Example]:
        """For each evaluation caption, the top-k evaluation images before and after fine-tuning."""
        self._require_finished("example results")
        if not (self.path / EXAMPLES_DIR / "after.npz").is_file():
            raise RunError(f"run {self.name!r} had no evaluation data, so it has no example results")
        return read_examples(self.path / EXAMPLES_DIR, k)


def read_examples(folder: Path, k: int = 5) -> list[Example]:
    """The examples of `folder` (before.npz and after.npz, written by worker.save_pair_embeddings): a run's
    examples/, or a saved model's (`clip-finetune train` writes them there for `clip-finetune report`)."""
    files = [folder / f"{when}.npz" for when in ("before", "after")]
    if not all(f.is_file() for f in files):
        raise RunError(f"{str(folder)!r} holds no before.npz and after.npz, so there are no example results")
    try:
        (captions, targets, before, relevant), (_, _, after, _) = (_ranked(file, k) for file in files)
        return [Example(q, t, b, a, tuple(r))
                for q, t, b, a, r in zip(captions, targets, before, after, relevant, strict=True)]
    except (KeyError, IndexError, ValueError, TypeError) as e:  # shapes or indices that do not fit
        raise RunError(f"the example files in {str(folder)!r} are damaged ({type(e).__name__}: {e}); there are no "
                       "example results (the model and its metrics are unaffected)") from None


def _ranked(file: Path, k: int) -> tuple[list[str], list[str], list[list[tuple[str, float]]], list[list[str]]]:
    """(captions, each caption's image, its top-k (image, score), its relevant images) of one examples file, read
    bounded (a planted or truncated file is a DataError naming it; an index out of range an IndexError)."""
    d = load_npz(file, EXAMPLE_ARRAYS, ("relevant",),
                 "the run's example results are lost; its model and metrics are not")
    images, captions, owner = d["images"].tolist(), d["captions"].tolist(), d["text_to_image"]
    links = d["relevant"].tolist() if "relevant" in d else list(enumerate(owner.tolist()))
    if len(owner) != len(captions) or any(not 0 <= int(i) < len(images) for i in owner.tolist()) or any(
            not (0 <= int(t) < len(captions) and 0 <= int(i) < len(images)) for t, i in links):
        raise IndexError(f"{len(captions)} captions, {len(images)} images: a pair or caption owner is out of range")
    idx, scores = top_k_by_dot(d["text_features"], d["image_features"], k)  # [n_texts, k]
    top = [[(images[i], float(s)) for i, s in zip(row_i, row_s, strict=True)]
           for row_i, row_s in zip(idx, scores, strict=True)]
    relevant: list[list[str]] = [[] for _ in captions]
    for t, i in links:
        relevant[int(t)].append(images[int(i)])
    return captions, [images[int(o)] for o in owner], top, relevant


@at_boundary
def get_run(name: str, runs_dir: str | os.PathLike | None = None) -> Run:
    """Reconnect to the run called `name` in the runs folder (after a restart too)."""
    root = runs_root(runs_dir)
    run_dir = root / check_run_name(name)
    if not (run_dir / STATE_NAME).is_file():
        known = [r.name for r in list_runs(root)]
        hint = f"runs there: {', '.join(known[-10:])}" if known else "it holds no runs"
        raise RunError(f"no run named {name!r} in {str(root)!r}; {hint} (another runs folder: --runs-dir DIR on "
                       f"the command line, runs_dir=DIR in Python, or ${RUNS_DIR_ENV})")
    return Run(run_dir)


@at_boundary
def list_runs(runs_dir: str | os.PathLike | None = None) -> list[Run]:
    """Every run in the runs folder, oldest first."""
    root = runs_root(runs_dir)
    folders = [d for d in root.iterdir() if (d / STATE_NAME).is_file()] if root.is_dir() else []
    runs = []
    for folder in folders:
        try:
            runs.append((read_state(folder)["created_at"], folder.name, Run(folder)))
        except ClipFinetuneError as e:  # one damaged run folder does not hide the others
            log.warning("skipping %s: %s", folder.name, e)
    return [run for *_, run in sorted(runs, key=lambda r: (str(r[0]), r[1]))]
