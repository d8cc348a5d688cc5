"""What the tests share instead of retyping: the tiny architecture and its training settings, image bytes
(plain, and deliberately broken), a dtlpy subset download written by hand, and synthetic captioned shapes
seeded on the loopback platform.

Test modules import from here, never from each other; conftest.py holds the fixtures.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopback_platform import LoopbackPlatform, image_bytes, png_bytes, tag_subset_filter
from PIL import Image

from adapters.clip_finetune.data.synthetic import render, sample_specs

if TYPE_CHECKING:
    import dtlpy as dl
    import numpy as np
    import pytest
    import torch

    from adapters.clip_finetune.model.clip import ClipModel

# image_bytes and png_bytes are the one image writer: the stand-in's, which seeds its items with them.
__all__ = [
    "QUICK_CONFIG",
    "Progress",
    "REPO",
    "SHARED_TRAINING",
    "TINY_MODEL",
    "TINY_TRAINING",
    "Shapes",
    "TrainedModel",
    "TunedTwice",
    "add_item",
    "add_model",
    "add_prompt_item",
    "deadline",
    "folder_digest",
    "free_text",
    "image_bytes",
    "image_prompt",
    "noise_jpeg_bytes",
    "oid",
    "pairs_table",
    "png_bytes",
    "png_declaring",
    "published",
    "rig_validation",
    "seed_shapes",
    "set_args",
    "stock_open_clip_embeddings",
    "stream",
    "train_shared_model",
    "train_shared_model_once",
    "tune_twice",
]

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------- the tiny model
# The tiny open_clip architecture (random init, embed_dim 64) that tests train in seconds on a CPU.
TINY_MODEL = REPO / "adapters" / "clip_finetune" / "model_configs" / "clip-tiny.json"

# From-scratch training of the tiny model: random init, a learning rate far above the fine-tuning default,
# and no DataLoader worker processes (the machine is small; dtlpy and loopback threads are alive).
# A test that needs other values says so: {**TINY_TRAINING, "num_epochs": 5}.
TINY_TRAINING: dict[str, Any] = {"pretrained": None, "learning_rate": 1e-3, "train_batch_size": 16, "num_workers": 0}

# A model entity's configuration on the loopback platform: the tiny model, one quick epoch.
# seed 0: the random init (load_model draws it under the configured seed) the held-out thresholds were measured on
QUICK_CONFIG: dict[str, Any] = {"model_name": str(TINY_MODEL), **TINY_TRAINING, "learning_rate": 2e-3,
                                "num_epochs": 1, "train_batch_size": 8, "early_stopping_epochs": 3, "seed": 0}


# ------------------------------------------------------------------------- the run's shared trained model
# 6 epochs of 480 synthetic training pairs in batches of 32 (90 steps), warmup then cosine decay, no early stop:
# held-out text->image R@1 goes from chance (~0.007) to ~0.1 (test_train.py asserts by how much).
SHARED_TRAINING: dict[str, Any] = {**TINY_TRAINING, "train_batch_size": 32, "batch_size": 128, "num_epochs": 6,
                                   "warmup": 0.1, "early_stopping": False}


@dataclass(frozen=True)
class TrainedModel:
    """The `trained_model` fixture: one model trained once per test run, read-only to every test.

    `folder` is the saved model (open_clip files, finetune_config.json, metrics.json); `result` and `epochs` what
    finetune() returned and reported per epoch; `config` the settings it trained with (a FinetuneConfig); `train`,
    `validation` the pairs it trained and selected on; `test` 150 pairs held out from both.
    """

    folder: Path
    result: Any
    epochs: list[dict[str, float]]
    config: Any
    train: list[Any]
    validation: list[Any]
    test: list[Any]


def train_shared_model(root: Path) -> TrainedModel:
    """Train the tiny model (SHARED_TRAINING) on synthetic downloads under `root`; the model goes to root/model."""
    from adapters.clip_finetune.config import build_config
    from adapters.clip_finetune.data.load import Splits, load_dataset
    from adapters.clip_finetune.data.synthetic import write_dataloop_download
    from adapters.clip_finetune.training import finetune

    write_dataloop_download(root / "dev", 480, 120, seed=1)
    write_dataloop_download(root / "test", 0, 150, seed=2)  # held out from training AND model selection
    dev, _ = load_dataset(root / "dev")
    test, _ = load_dataset(root / "test")
    cfg = build_config(SHARED_TRAINING, {"model_name": str(TINY_MODEL)})
    epochs: list[dict[str, float]] = []
    result = finetune(cfg, Splits(dev["train"], dev["validation"]), root / "model",
                      on_epoch_end=lambda e, rec: epochs.append(rec), progress=False)
    return TrainedModel(root / "model", result, epochs, cfg, dev["train"], dev["validation"], test["validation"])


class Progress:
    """Stands in for dl.Progress handed to an adapter's function in-process: records what it reports."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []

    def update(self, **kwargs: Any) -> None:
        self.updates.append(kwargs)


def made_once(root: Path, make: Callable[[Path], Any]) -> Any:
    """make(root) by the first process to ask (of the pytest-xdist workers sharing `root`); the others wait on the
    lock, then read what it pickled in `root`. (xdist's recipe for a session fixture made once per run; fcntl from
    the standard library: the tests are POSIX-only already, SIGALRM, RLIMIT_FSIZE.)"""
    import fcntl
    import pickle

    root.mkdir(parents=True, exist_ok=True)
    made = root / "made-once.pickle"
    with (root / "made-once.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if made.is_file():
            return pickle.loads(made.read_bytes())
        result = make(root)
        made.write_bytes(pickle.dumps(result))
        return result


def train_shared_model_once(root: Path) -> TrainedModel:
    """train_shared_model(root), once for all the pytest-xdist workers sharing `root` (made_once)."""
    return made_once(root, train_shared_model)


# ------------------------------------------------------------- the shared model tuned again, on another domain
# 3 epochs of 192 pattern pairs in batches of 32 (18 steps) at 1e-3: plain fine-tuning forgets the shapes (measured:
# retention MRR 0.243 -> 0.176 on the 150 held-out shapes) and auto WiSE-FT keeps them (alpha 0.3: 0.240) while the
# patterns' validation MRR rises 0.241 -> 0.310; at 3e-3 every mix lost more than a point and alpha 0 was shipped
RETUNE: dict[str, Any] = {"learning_rate": 1e-3, "train_batch_size": 32, "batch_size": 128, "num_epochs": 3,
                          "num_workers": 0, "warmup": 0.1, "early_stopping": False}


@dataclass(frozen=True)
class TunedTwice:
    """The `retention_tuned` fixture: the shared model fine-tuned from its folder on patterns, plainly (`plain`,
    wise_ft_auto false) and with auto WiSE-FT (`auto`, its stdout and how often each image was decoded), with
    the shared model's held-out shapes as the retention set; `test`: held-out pattern pairs."""

    plain: Path
    auto: Path
    stdout: str
    retention: Path
    test: Path
    decodes: dict[str, int]


def pairs_table(path: Path, pairs: list[Any]) -> Path:
    """A `filepath,caption` table of caption pairs (their image paths as they are)."""
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows((p.image, p.caption) for p in pairs)
    return path


def tune_twice(shared: TrainedModel, root: Path) -> TunedTwice:
    """Fine-tune the shared model again (`--set pretrained=FOLDER`) on patterns through the command line."""
    import io
    from collections import Counter

    import pytest

    from adapters.clip_finetune.cli.main import main
    from adapters.clip_finetune.data import decode_cache
    from adapters.clip_finetune.data.patterns import write_pattern_csv

    tables = {}
    for name, n, seed in (("train", 192, 11), ("validation", 48, 12), ("test", 64, 13)):
        (root / name).mkdir()
        tables[name] = write_pattern_csv(root / name / "b.csv", n, seed=seed)
    retention = pairs_table(root / "retention.csv", shared.test)  # what the shared model learned (150 pairs)
    common = ["train", "--data", str(tables["train"]), "--validation", str(tables["validation"]), "--retention",
              str(retention), *set_args({**RETUNE, "pretrained": str(shared.folder)})]
    assert main([*common, "--out", str(root / "plain"), "--set", "wise_ft_auto=false"]) == 0
    decodes: Counter = Counter()

    def counted(real: Any) -> Any:
        def decode(source: Any, *args: Any, **kwargs: Any) -> Any:
            decodes[str(source)] += 1
            return real(source, *args, **kwargs)
        return decode

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        # every decode of the run's images: the training cache's (load_image) and the evaluations' (decode)
        for name in ("load_image", "decode"):
            mp.setattr(decode_cache, name, counted(getattr(decode_cache, name)))
        assert main([*common, "--out", str(root / "auto")]) == 0
    return TunedTwice(root / "plain", root / "auto", out.getvalue(), retention, tables["test"], dict(decodes))


def folder_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`: what a test that must not write there can check."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging when the body runs past `seconds` (a read blocked on a FIFO would
    hang CI otherwise). Main thread only: SIGALRM interrupts the blocked system call."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what}: still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def set_args(config: dict[str, Any]) -> list[str]:
    """`config` as `clip-finetune` options: ["--set", "key=value", ...], each value as JSON (None: null)."""
    return [a for k, v in config.items()
            for a in ("--set", f"{k}={v if isinstance(v, str | Path) else json.dumps(v)}")]


def stock_open_clip_embeddings(folder: Path, images: list[str], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
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


def rig_validation(monkeypatch: pytest.MonkeyPatch, best_call: int) -> list[dict[str, torch.Tensor]]:
    """Make fit's `best_call`-th validation the best by far; return the weights at every validation."""
    from adapters.clip_finetune.training import loop as train_module

    real, states = train_module.evaluate, []

    def rigged(clip: ClipModel, pairs: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        scores = real(clip, pairs, *args, **kwargs)
        states.append({k: v.detach().clone() for k, v in clip.model.state_dict().items()})
        return {k: v + 10.0 for k, v in scores.items()} if len(states) - 1 == best_call else scores

    monkeypatch.setattr(train_module, "evaluate", rigged)
    return states


# -------------------------------------------------------------------------------- deliberately bad images
def noise_jpeg_bytes() -> bytes:
    """A 64x64 JPEG of noise: big enough that its first 600 bytes are a truncated image, not an empty one."""
    return image_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")


def png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched to declare width x height (CRC fixed up): a decompression bomb."""
    data = bytearray(image_bytes(Image.new("RGB", (4, 4))))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


# ----------------------------------------------------------------- a subset download, written by hand
def oid(n: int) -> str:
    return f"{n:024x}"


def add_item(subset: Path, item_id: str, filename: str, content: bytes | None = b"\x89PNG fake", **record: Any) -> Path:
    """Write items/<filename> (unless content is None) and json/<dir>/<stem>.json, as dtlpy downloads them."""
    rel = filename.lstrip("/")
    if content is not None:
        (subset / "items" / rel).parent.mkdir(parents=True, exist_ok=True)
        (subset / "items" / rel).write_bytes(content)
    meta = record.pop("metadata", {"system": {"mimetype": "image/png"}})
    data = {"id": item_id, "filename": filename, "type": "file", "metadata": meta, "annotations": [], **record}
    json_path = subset / "json" / Path(rel).parent / (Path(rel).stem + ".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data))
    return subset / "items" / rel


def add_prompt_item(subset: Path, item_id: str, prompts: dict[str, list[dict]], annotations: list[dict],
                    shebang: bool = True) -> None:
    content = json.dumps({"shebang": "dataloop", "metadata": {"dltype": "prompt"}, "prompts": prompts}).encode()
    system: dict[str, Any] = {"mimetype": "application/json"}
    if shebang:
        system["shebang"] = {"dltype": "prompt"}
    add_item(subset, item_id, f"/prompts/{item_id}.json", content, metadata={"system": system},
             annotations=annotations)


def image_prompt(value: str) -> list[dict]:
    return [{"mimetype": "image/*", "value": value}, {"mimetype": "metadata", "value": {"role": "user"}}]


def free_text(prompt_id: str, text: str) -> dict:
    return {"type": "text", "label": "free-text", "coordinates": text, "metadata": {"system": {"promptId": prompt_id}}}


def stream(item_id: str) -> str:
    return f"https://gate.dataloop.ai/api/v1/items/{item_id}/stream"


# ---------------------------------------------------------------------- shapes on the loopback platform
@dataclass
class Shapes:
    """A project with a dataset of synthetic captioned shapes and the model entities made on it."""

    project: dict[str, Any]
    dataset: dict[str, Any]
    items: dict[str, list[dict[str, Any]]]


def seed_shapes(platform: LoopbackPlatform, sizes: dict[str, int], seed: int = 0) -> Shapes:
    """Image items captioned by `description`, tagged with their split, under /<split>/."""
    project = platform.add_project()
    dataset = platform.add_dataset(project["id"], "shapes")
    specs = sample_specs(sum(sizes.values()), seed)
    items: dict[str, list[dict[str, Any]]] = {}
    for split, n in sizes.items():
        chunk, specs = specs[:n], specs[n:]
        items[split] = [
            platform.add_item(dataset["id"], image_bytes(render(spec)), f"/{split}/{i:04d}.png",
                              description=spec.caption, tags=[split])
            for i, spec in enumerate(chunk)
        ]
    return Shapes(project, dataset, items)


def add_model(platform: LoopbackPlatform, shapes: Shapes, configuration: dict[str, Any],
              more_subsets: tuple[str, ...] = ()) -> dl.Model:
    """A pre-trained model entity on the train/validation tags (and each of `more_subsets`, e.g. retention);
    unique name (dtlpy keys artifacts by name)."""
    import dtlpy as dl

    model = platform.add_model(
        shapes.project["id"], f"clip-{uuid.uuid4().hex[:8]}", configuration, shapes.dataset["id"],
        subsets={name: tag_subset_filter(name) for name in ("train", "validation", *more_subsets)},
    )
    return dl.models.get(model_id=model["id"])


def published(platform: LoopbackPlatform, model_id: str, figure: str) -> dict[str, dict[Any, float]]:
    """{legend: {x: y}} of one figure of the model's published metrics."""
    out: dict[str, dict[Any, float]] = {}
    for s in platform.metrics(model_id):
        if s["figure"] == figure:
            out.setdefault(s["legend"], {})[s["data"]["x"]] = s["data"]["y"]
    return out
