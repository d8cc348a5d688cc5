"""Shared test setup: an isolated DATALOOP_PATH (set before anything imports dtlpy) and the tiny model."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# dtlpy writes cookie.json and logs under $DATALOOP_PATH at import time: never touch the user's ~/.dataloop.
os.environ["DATALOOP_PATH"] = tempfile.mkdtemp(prefix="dataloop-test-")

import pytest  # noqa: E402

TINY_MODEL = Path(__file__).resolve().parents[1] / "adapters" / "clip_finetune" / "model_configs" / "clip-tiny.json"


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


def stock_open_clip_embeddings(folder: Path, images: list[str], texts: list[str]) -> tuple:
    """Unit-norm image and text embeddings of a saved model as stock open_clip computes them (`local-dir:`)."""
    import open_clip
    import torch

    from adapters.clip_finetune.data.images import load_image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(load_image(p)) for p in images]), normalize=True)
        text = model.encode_text(tokenizer(texts), normalize=True)
    return image.numpy(), text.numpy()


from loopback_platform import platform_fixture  # noqa: E402,F401  (the `platform` fixture)
