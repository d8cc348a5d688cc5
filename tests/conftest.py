"""Shared test setup: an isolated DATALOOP_PATH (set before anything imports dtlpy) and the fixtures.

What tests share that is not a fixture (the tiny model's path and settings, image writers, seeding) is in
helpers.py.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# dtlpy writes cookie.json and logs under $DATALOOP_PATH at import time: never touch the user's ~/.dataloop.
os.environ["DATALOOP_PATH"] = tempfile.mkdtemp(prefix="dataloop-test-")
# training stores the base model's validation embeddings (base_eval_cache): never in the user's ~/.cache
os.environ["CLIP_FINETUNE_CACHE"] = tempfile.mkdtemp(prefix="clip-finetune-cache-test-")
for _folder in (os.environ["DATALOOP_PATH"], os.environ["CLIP_FINETUNE_CACHE"]):
    atexit.register(shutil.rmtree, _folder, True)  # removed when the test run ends

import pytest  # noqa: E402
from helpers import TINY_MODEL  # noqa: E402
from loopback_platform import platform_fixture  # noqa: E402,F401  (the `platform` fixture)


@pytest.fixture(scope="session")
def tiny_model_config() -> Path:
    """Path of the tiny open_clip architecture (random init) that tests train in seconds on a CPU."""
    return TINY_MODEL


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for tests whose dtlpy thread pools decode beside the model: on a busy 2-core machine
    two OpenMP threads spin against that work (a training step measured 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
