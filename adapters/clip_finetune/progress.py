"""Progress of anything that takes seconds: a tqdm bar on a terminal, a plain log line every few seconds
elsewhere (a CI log, a Dataloop service log, a file), where a bar's carriage returns pile up into lines
thousands of characters long."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")

INTERVAL_ENV = "CLIP_FINETUNE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0  # seconds between two log lines when stderr is not a terminal


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
             initial: int = 0) -> Iterator[T]:
    """Iterate `iterable`, showing progress when `enabled`: tqdm on a terminal, else a log line at most every
    $CLIP_FINETUNE_PROGRESS_SECONDS (default 30) and one when done. The result has tqdm's `set_postfix`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not enabled:
        return _Silent(iterable)
    if _is_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial)
    return _Logged(iterable, desc, total, unit, initial, _interval())


def _is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


class _Silent:
    """An iterable with tqdm's set_postfix, showing nothing."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def set_postfix(self, **kwargs: Any) -> None:
        pass


class _Logged(_Silent):
    """Logs `desc: n/total unit (p%), elapsed, remaining[, postfix]` every `interval` seconds and at the end."""

    def __init__(self, iterable: Iterable[Any], desc: str, total: int | None, unit: str, initial: int,
                 interval: float) -> None:
        super().__init__(iterable)
        self.desc, self.total, self.unit, self.n, self.interval = desc, total, unit, initial, interval
        self._start = self._last = time.monotonic()
        self._done_at_start = initial
        self._postfix = ""

    def set_postfix(self, **kwargs: Any) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

    def __iter__(self) -> Iterator[Any]:
        for x in self._iterable:
            yield x
            self.n += 1
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                log.info("%s", self.line(now))
        log.info("%s", self.line(time.monotonic(), done=True))

    def line(self, now: float, done: bool = False) -> str:
        elapsed = now - self._start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {count} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {_duration(elapsed)}"
        rate = (self.n - self._done_at_start) / elapsed if elapsed > 0 else 0.0
        if not done and self.total and rate > 0:
            text += f", about {_duration((self.total - self.n) / rate)} left"
        if done:
            text += " (done)"
        return f"{text}, {self._postfix}" if self._postfix else text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
