"""Progress shows as a bar on a terminal and as plain, short log lines elsewhere (CI logs, platform services)."""

from __future__ import annotations

import logging

from adapters.clip_finetune import progress as progress_module
from adapters.clip_finetune.progress import progress


def test_off_a_terminal_progress_is_a_few_plain_log_lines(caplog, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "_is_terminal", lambda: False)
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "0")  # a line after every step
    caplog.set_level(logging.INFO, logger=progress_module.__name__)
    shown = progress(range(4), "evaluate: embed images", unit="batch")
    seen = []
    for i in shown:
        seen.append(i)
        shown.set_postfix(loss="0.5")
    lines = [r.getMessage() for r in caplog.records]
    assert seen == [0, 1, 2, 3]
    assert lines[0].startswith("evaluate: embed images: 1/4 batch (25%), 0 s") and lines[0].endswith("loss 0.5")
    assert lines[-1].startswith("evaluate: embed images: 4/4 batch (100%)") and "(done)" in lines[-1]
    assert all("\r" not in line and len(line) < 200 for line in lines)


def test_the_interval_bounds_the_log_lines(caplog, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "_is_terminal", lambda: False)
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "3600")
    caplog.set_level(logging.INFO, logger=progress_module.__name__)
    assert list(progress(range(1000), "tokenize captions")) == list(range(1000))
    assert [r.getMessage() for r in caplog.records] == ["tokenize captions: 1000/1000 it (100%), 0 s (done)"]


def test_disabled_progress_says_nothing(caplog, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "_is_terminal", lambda: False)
    caplog.set_level(logging.INFO, logger=progress_module.__name__)
    shown = progress(iter([1, 2]), "quiet", enabled=False)
    shown.set_postfix(loss=1)
    assert list(shown) == [1, 2] and caplog.records == []
