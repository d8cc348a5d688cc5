"""Shared test setup: an isolated DATALOOP_PATH (set before anything imports dtlpy) and the tiny model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# dtlpy writes cookie.json and logs under $DATALOOP_PATH at import time: never touch the user's ~/.dataloop.
os.environ["DATALOOP_PATH"] = tempfile.mkdtemp(prefix="dataloop-test-")

import pytest  # noqa: E402

TINY_MODEL = Path(__file__).resolve().parents[1] / "adapters" / "clip_finetune" / "model_configs" / "clip-tiny.json"


@pytest.fixture(scope="session")
def tiny_model_config() -> Path:
    """Path of the tiny open_clip architecture (random init) that tests train in seconds on a CPU."""
    return TINY_MODEL

from loopback_platform import platform_fixture  # noqa: E402,F401  (the `platform` fixture)
