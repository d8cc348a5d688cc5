"""Reliability of the adapter against platform faults and concurrent use, through the real dtlpy client and the
loopback platform: several executions embedding at once in one process, vector and artifact uploads that answer
500, drop the connection or hang, and datasets with broken files.

The rules asserted here:
- embed() and prepare_item_func() from many threads at once give the vectors sequential calls give;
- an embedding job whose vectors were not all stored raises VectorsNotStoredError with the count, never returns
  as if it succeeded; re-running it after the fault stores the rest, each item's vector exactly once;
- bad items (undecodable files) get no vector, are listed with their reasons, and do not fail the job;
- train_model with a failed artifact upload raises naming what was not stored, and a re-run ends 'trained' with
  each artifact once.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import dtlpy as dl
import numpy as np
import pytest
import requests
import torch
from helpers import QUICK_CONFIG, TINY_MODEL, add_model, image_bytes, png_bytes, png_declaring, seed_shapes
from loopback_platform import LoopbackPlatform
from PIL import Image

from adapters.clip_finetune.data.pairs import DataReport
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.dataloop.embed_job import VectorsNotStoredError
from adapters.clip_finetune.dataloop.items import Unusable
from adapters.clip_finetune.errors import ModelError

EMBED_CONFIG: dict[str, Any] = {"model_name": str(TINY_MODEL), "pretrained": None, "batch_size": 4, "num_workers": 0}
VECTORS = r"^/features/vectors$"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- helpers
class Embedding:
    """A project with one dataset and a random-init tiny model entity (no artifacts) to embed with."""

    def __init__(self, platform: LoopbackPlatform) -> None:
        self.platform = platform
        self.project = platform.add_project()
        self.dataset = platform.add_dataset(self.project["id"], f"items-{uuid.uuid4().hex[:6]}")
        model = platform.add_model(self.project["id"], f"clip-{uuid.uuid4().hex[:8]}", EMBED_CONFIG,
                                   self.dataset["id"])
        self.model_id = model["id"]

    def add_images(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        return [self.platform.add_item(self.dataset["id"], image_bytes(render(s)), f"/images/{seed}-{i}.png")
                for i, s in enumerate(sample_specs(n, seed))]

    def adapter(self) -> ClipAdapter:
        torch.manual_seed(0)
        return ClipAdapter(model_entity=dl.models.get(model_id=self.model_id))

    def stored(self) -> Counter[str]:
        """How many vectors each item has in the model's feature set."""
        sets = self.platform.model_feature_sets(self.model_id)
        return Counter(v["entityId"] for fs in sets for v in self.platform.vectors(fs["id"]))

    def values(self) -> dict[str, list[float]]:
        sets = self.platform.model_feature_sets(self.model_id)
        return {v["entityId"]: v["value"] for fs in sets for v in self.platform.vectors(fs["id"])}


@pytest.fixture
def embedding(platform: LoopbackPlatform) -> Embedding:
    return Embedding(platform)


def after_first_upload(platform: LoopbackPlatform, inject: Callable[[], None]) -> None:
    """Run `inject` (install a fault) once the first vector upload has been answered: later ones meet it."""
    dispatch, done = platform._dispatch, threading.Event()

    def dispatching(method: str, raw_path: str, headers: dict[str, str], body: bytes) -> Any:
        reply = dispatch(method, raw_path, headers, body)
        if method == "POST" and raw_path.split("?")[0].endswith("/features/vectors") and not done.is_set():
            done.set()
            inject()
        return reply

    platform._dispatch = dispatching  # type: ignore[method-assign]


def vector_upload_timeout(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """dtlpy sends every request with timeout=120 s, and retries it: shorten it for vector uploads, so a hung
    server fails the upload in about a second instead of minutes."""
    session = dl.client_api.session
    send = session.send

    def send_with_timeout(request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if request.method == "POST" and str(request.url).endswith("/features/vectors"):
            kwargs["timeout"] = seconds
        return send(request, **kwargs)

    monkeypatch.setattr(session, "send", send_with_timeout)


def settle(platform: LoopbackPlatform, timeout: float = 10.0) -> None:
    """Wait until the platform has answered every vector upload (a hung one finishes late, after the client
    gave up on it)."""
    deadline = time.monotonic() + timeout
    while any(c.status == 0 and c.fault is None for c in platform.calls_to("POST", VECTORS)):
        assert time.monotonic() < deadline, "the platform is still handling vector uploads"
        time.sleep(0.05)


def truncated_jpeg() -> bytes:
    data = image_bytes(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    return data[: len(data) // 2]


def add_bomb(platform: LoopbackPlatform, dataset_id: str, remote_path: str) -> str:
    """A PNG item declaring 100000 x 100000 pixels. Stored as an octet stream, then given its image mimetype:
    the stand-in measures image items with Pillow, which refuses a bomb that the real platform would store."""
    item = platform.add_item(dataset_id, png_declaring(100_000, 100_000), remote_path,
                             mimetype="application/octet-stream")
    platform.items[item["id"]]["metadata"]["system"]["mimetype"] = "image/png"
    return item["id"]


# ------------------------------------------------------------------------------------------ concurrency
class BorrowChecked:
    """A tokenizer that fails when two threads use it at once, as Hugging Face fast tokenizers do
    ("RuntimeError: Already borrowed", huggingface/tokenizers#537)."""

    def __init__(self, tokenizer: Callable[..., Any]) -> None:
        self.tokenizer, self.inside = tokenizer, threading.Semaphore(1)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.inside.acquire(blocking=False):
            raise RuntimeError("Already borrowed")
        try:
            time.sleep(0.005)  # long enough for the other threads to collide
            return self.tokenizer(*args, **kwargs)
        finally:
            self.inside.release()


def test_embed_from_10_threads_at_once_gives_the_sequential_vectors(embedding: Embedding) -> None:
    images = embedding.add_images(6)
    texts = [embedding.platform.add_item(embedding.dataset["id"], f"a shape number {i}".encode(), f"/t/{i}.txt")
             for i in range(4)]
    broken = embedding.platform.add_item(embedding.dataset["id"], b"not a png", "/bad/b.png")
    items = [dl.items.get(item_id=i["id"]) for i in (*images, *texts, broken)]
    adapter = embedding.adapter()
    adapter.clip.tokenizer = BorrowChecked(adapter.clip.tokenizer)
    batches = [[items[(t + k) % len(items)] for k in range(5)] for t in range(10)]  # each mixes images + texts

    expected = [adapter.embed([adapter.prepare_item_func(i) for i in batch]) for batch in batches]
    report_before = (adapter.embed_report.used, adapter.embed_report.total_skipped)
    start, errors = threading.Barrier(10), []
    results: list[Any] = [None] * 10

    def run(t: int) -> None:
        try:
            start.wait()
            results[t] = adapter.embed([adapter.prepare_item_func(i) for i in batches[t]])
        except Exception as e:  # collected: an exception in a thread would not fail the test by itself
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    for got, want in zip(results, expected, strict=True):
        assert [v is None for v in got] == [v is None for v in want]
        assert np.allclose([v for v in got if v], [v for v in want if v], atol=1e-6)
    assert (adapter.embed_report.used, adapter.embed_report.total_skipped) == tuple(2 * n for n in report_before)


class NonAtomicReport(DataReport):
    """A DataReport whose update yields between reading and writing a count, as a thread switch can (or a
    free-threaded Python): concurrent updates lose counts unless the caller serialises them."""

    def skip(self, reason: str, example: str) -> None:
        count = self.skipped[reason]
        time.sleep(0)
        self.skipped[reason] = count + 1


def test_the_embed_report_loses_no_count_when_threads_race(embedding: Embedding) -> None:
    adapter = embedding.adapter()
    adapter.embed_report = NonAtomicReport()
    batch = [Unusable("item-a", "undecodable image"), Unusable("item-b", "download failed", transient=True), ""]
    threads = [threading.Thread(target=lambda: [adapter.embed(batch) for _ in range(100)]) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert dict(adapter.embed_report.skipped) == {"undecodable image": 1000, "download failed": 1000,
                                                  "nothing to embed": 1000}


# ------------------------------------------------------------------------------------ vector upload faults
FAULTS: dict[str, Callable[[LoopbackPlatform], None]] = {
    "500": lambda p: p.fail("POST", VECTORS, status=500, times=None),
    "dropped connection": lambda p: p.drop("POST", VECTORS, times=None),
    "hung server": lambda p: p.delay("POST", VECTORS, seconds=1.0, times=None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_vector_upload_fails_the_job_with_the_count_and_a_rerun_completes_it_without_duplicates(
    embedding: Embedding, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    platform = embedding.platform
    ids = [i["id"] for i in embedding.add_images(10)]
    dataset = dl.datasets.get(dataset_id=embedding.dataset["id"])
    adapter = embedding.adapter()  # batch_size 4: uploads of 4, 4 and 2 vectors

    def inject() -> None:
        FAULTS[fault](platform)
        vector_upload_timeout(monkeypatch, 0.3)

    after_first_upload(platform, inject)

    with pytest.raises(VectorsNotStoredError) as raised:
        adapter.embed_dataset(dataset)

    message = str(raised.value)
    assert "6 of 10 vectors were not stored" in message, message
    assert ("HTTP 500" if fault == "500" else "no answer") in message
    assert "re-run embed_items or embed_dataset" in message
    settle(platform)  # a hung upload is stored late, once per attempt of the SDK
    stored_during_fault = embedding.stored()
    assert len(stored_during_fault) == 4 + (4 if fault == "hung server" else 0)
    platform.clear_faults()
    n_calls = len(platform.calls)

    adapter.embed_dataset(dataset)  # the re-run

    assert embedding.stored() == Counter(ids)  # every item once: the late copies of a hung upload are deleted
    resent = [e["entityId"] for c in platform.calls[n_calls:] if c.method == "POST" and c.path == "/features/vectors"
              for e in c.json]
    assert sorted(resent) == sorted(set(ids) - set(stored_during_fault))  # only what was missing
    values = embedding.values()
    items = [dl.items.get(item_id=i) for i in ids]
    expected = adapter.embed([adapter.prepare_item_func(i) for i in items])
    assert np.allclose([values[i] for i in ids], expected, atol=1e-6)


def test_embed_items_returns_stored_vectors_for_items_it_skips(embedding: Embedding) -> None:
    ids = [i["id"] for i in embedding.add_images(5)]
    items = [dl.items.get(item_id=i) for i in ids]
    adapter = embedding.adapter()
    adapter.embed_items(items[:2])

    returned, vectors = adapter.embed_items(items)

    assert adapter.embed_report.used == 2 + 3  # the second job embedded only the 3 new items
    assert [i.id for i in returned] == ids
    assert embedding.stored() == Counter(ids)
    assert np.allclose(vectors, adapter.embed([adapter.prepare_item_func(i) for i in items]), atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad items
def test_bad_items_get_no_vector_are_listed_with_reasons_and_do_not_fail_the_job(
    embedding: Embedding, caplog: pytest.LogCaptureFixture
) -> None:
    platform, dataset_id = embedding.platform, embedding.dataset["id"]
    good = [i["id"] for i in embedding.add_images(3)]
    good.append(platform.add_item(dataset_id, png_bytes((255, 0, 0), size=(1, 1)), "/images/1x1.png")["id"])
    bad = {
        platform.add_item(dataset_id, truncated_jpeg(), "/bad/truncated.jpg")["id"]: "truncated",
        platform.add_item(dataset_id, b"", "/bad/empty.jpg", mimetype="image/jpeg")["id"]: "empty file",
        platform.add_item(dataset_id, b"a caption, not a picture", "/bad/text.jpg")["id"]: "cannot identify image",
        add_bomb(platform, dataset_id, "/bad/bomb.png"): "decompression bomb",
    }
    adapter = embedding.adapter()

    with caplog.at_level(logging.WARNING, logger="adapters.clip_finetune.dataloop.adapter"):
        adapter.embed_dataset(dl.datasets.get(dataset_id=dataset_id))  # returns: the job succeeds

    assert embedding.stored() == Counter(good)
    assert dict(adapter.embed_report.skipped) == {"undecodable image": len(bad)}
    assert sorted(adapter.embed_report.examples["undecodable image"]) == sorted(bad)
    (warning,) = [r.getMessage() for r in caplog.records if "cannot be embedded" in r.getMessage()]
    assert f"{len(bad)} of {len(good) + len(bad)} items cannot be embedded" in warning
    for item_id, reason in bad.items():
        assert f"{item_id} (undecodable image: " in warning and reason in warning.lower(), (reason, warning)
    assert "/tmp" not in warning  # the item's name, not the temporary file it was decoded from


def test_bad_items_are_listed_in_the_error_when_an_upload_fails_too(embedding: Embedding) -> None:
    ids = [i["id"] for i in embedding.add_images(2)]
    broken = embedding.platform.add_item(embedding.dataset["id"], b"", "/bad/empty.png", mimetype="image/png")["id"]
    embedding.platform.fail("POST", VECTORS, status=500, times=None)

    with pytest.raises(VectorsNotStoredError) as raised:
        embedding.adapter().embed_items([dl.items.get(item_id=i) for i in (*ids, broken)])

    assert "2 of 3 vectors were not stored" in str(raised.value)
    assert f"1 items cannot be embedded (skipped): {broken} (undecodable image: empty file" in str(raised.value)


def test_an_item_that_fails_to_download_fails_the_job_and_a_rerun_embeds_it(embedding: Embedding) -> None:
    ids = [i["id"] for i in embedding.add_images(3)]
    items = [dl.items.get(item_id=i) for i in ids]
    adapter = embedding.adapter()
    embedding.platform.fail("GET", rf"^/items/{ids[1]}/stream$", status=500, times=None)

    with pytest.raises(VectorsNotStoredError, match=rf"1 of 3 vectors were not stored \(1 items could not be "
                                                    rf"downloaded: {ids[1]} \(download failed"):
        adapter.embed_items(items)
    embedding.platform.clear_faults()
    adapter.embed_items(items)

    assert embedding.stored() == Counter(ids)


# -------------------------------------------------------------------------------------- artifact faults
@pytest.mark.slow
def test_a_failed_artifact_upload_fails_training_and_a_rerun_stores_each_artifact_once(
    platform: LoopbackPlatform, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shapes = seed_shapes(platform, {"train": 16, "validation": 8})
    model = add_model(platform, shapes, QUICK_CONFIG)
    binaries = platform.binaries_dataset(shapes.project["id"])["id"]
    uploads = rf"^/datasets/{binaries}/items$"
    adapter = ClipAdapter()  # one adapter for the three runs, as in a deployed service

    for inject in (lambda: platform.fail("POST", uploads, status=500, times=None),
                   lambda: platform.drop("POST", uploads, times=None)):
        inject()
        with pytest.raises(ModelError) as raised:
            adapter.train_model(dl.models.get(model_id=model.id))
        platform.clear_faults()

        message = str(raised.value)  # every file of the output folder (how many depends on what train() writes)
        assert re.search(r"(\d+) of \1 artifact files were not stored: open_clip_model\.safetensors, "
                         r"open_clip_config\.json did not reach the platform, nor did (.*, )?data_report\.json, "
                         r"(.*, )?finetune_config\.json, metrics\.json", message), message
        assert platform.model(model.id)["status"] != "trained" and platform.artifacts(model.id) == []

    adapter.train_model(dl.models.get(model_id=model.id))  # the re-run once the faults are gone

    assert platform.model(model.id)["status"] == "trained"
    names = [a["name"] for a in platform.artifacts(model.id)]
    assert sorted(names) == sorted(set(names)) and {"open_clip_model.safetensors", "metrics.json"} <= set(names)
    in_binaries = [i["name"] for i in platform.dataset_items(binaries) if f"/models/{model.name}/" in i["filename"]]
    assert sorted(in_binaries) == sorted(names)  # no stray copy besides the referenced ones
