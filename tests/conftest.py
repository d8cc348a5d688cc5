"""Shared test setup: an isolated DATALOOP_PATH (set before anything imports dtlpy) and the fixtures, among them
`trained_model`: one model trained once for the whole test run.

What tests share that is not a fixture (the tiny model's path and settings, image writers, seeding) is in
helpers.py.
"""

from __future__ import annotations

import atexit
import gc
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
# pytest-xdist (pyproject's addopts: -n 2): each worker is one process per core, so torch gets one thread in each
# (set before torch is imported); two workers with a thread per core each would spin against each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_threads, "1")

import pytest  # noqa: E402
from helpers import TINY_MODEL, TrainedModel, TunedTwice, folder_digest, made_once, train_shared_model_once, tune_twice  # noqa: E402
from loopback_platform import platform_fixture  # noqa: E402,F401  (the `platform` fixture)


@pytest.fixture(scope="session")
def tiny_model_config() -> Path:
    """Path of the tiny open_clip architecture (random init) that tests train in seconds on a CPU."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedModel]:
    """The tiny model trained once for the whole run (helpers.SHARED_TRAINING), for every test that needs "a
    trained model" (evaluate, embed, search, export ...) rather than testing training itself.

    Read-only: file modes stop no one where tests run as root (containers, this project's CI machines), so the
    folder's content is compared when the run ends instead; a change there is an error of the last test using it.
    """
    # under pytest-xdist, trained once for all the workers (in the run's folder, above each worker's own)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "trained-model"
    else:
        root = tmp_path_factory.mktemp("trained-model")
    shared = train_shared_model_once(root)
    before = folder_digest(shared.folder)
    yield shared
    after = folder_digest(shared.folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared trained model's folder {shared.folder}: {changed}; copy it first"


@pytest.fixture(scope="session")
def retention_tuned(trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> TunedTwice:
    """The shared model fine-tuned again on another domain, plainly and with auto WiSE-FT (helpers.tune_twice):
    for the retention, WiSE-FT, gate and report tests."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # tuned once for all the workers, as trained_model
        return made_once(tmp_path_factory.getbasetemp().parent / "retention-tuned", lambda root: tune_twice(
            trained_model, root))
    return tune_twice(trained_model, tmp_path_factory.mktemp("retention"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for tests whose dtlpy thread pools decode beside the model: on a busy 2-core machine
    two OpenMP threads spin against that work (a training step measured 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A test process's end, as machine.exit_process does for the package's own processes: the interpreter's last
# garbage collection walks every object still alive (~800,000 with torch, open_clip, transformers, dtlpy) and took
# ~2.5-5 s of each worker's exit, which the run waits for; frozen after pytest's own end-of-run collections
# (unraisable exceptions), it is skipped. (Freezing after collection too was measured slower: the full
# collections during the tests came more often.)
@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    gc.freeze()
