"""The offline demo: synthetic captions, base model evaluated, fine-tuned, evaluated again, pictured.

It trains the tiny architecture shipped in model_configs/ from random init, because these machines
cannot download pretrained weights; that is why its learning rate is far above the defaults, which
are for fine-tuning pretrained CLIP (see docs/configuration.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..app.train import Training
from ..config import FinetuneConfig, build_config
from ..data.load import Splits, load_dataset
from ..data.pairs import CaptionPair
from ..data.synthetic import write_dataloop_download
from ..retrieval.evaluate import PairEmbeddings
from ..retrieval.formatting import format_table
from ..retrieval.ranking import top_k_by_dot
from ..training import TrainResult
from ..training.guard import check_output_folder
from .plots import plot_training_curves, search_sheet

log = logging.getLogger(__name__)

TINY_MODEL = Path(__file__).parents[1] / "model_configs" / "clip-tiny.json"
DEMO_MARK = ".clip-finetune-demo"  # in a demo's --out: its model/ is the demo's own, a rerun replaces it

# From-scratch training of a 3.5M-parameter model: a learning rate ~1000x a fine-tuning one.
DEMO_CONFIG: dict[str, Any] = {
    "model_name": str(TINY_MODEL),
    "pretrained": None,
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
    "warmup": 0.1,
    "num_epochs": 12,
    "train_batch_size": 64,
    "early_stopping": False,  # show the whole curve; the best epoch is still the one kept
    "batch_size": 128,
}


@dataclass
class DemoResult:
    table: str
    result: TrainResult
    out_dir: Path
    files: dict[str, Path]


def run_demo(
    out_dir: str | Path = "demo_output",
    n_train: int = 1500,
    n_validation: int = 300,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> DemoResult:
    """Generate data, evaluate the base model, fine-tune, evaluate again; write model, metrics, PNGs.

    `out_dir`/model is guarded as `train --out` is: a model or files there that an earlier demo did not write
    (its DEMO_MARK) are kept unless `overwrite`."""
    out = Path(out_dir)
    if not (overwrite or (out / DEMO_MARK).is_file()):
        check_output_folder(out / "model", overwrite=overwrite, flag="out")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("written by clip-finetune demo: a rerun may replace model/ here\n")
    data_root = out / "data"
    if not (data_root / "train").is_dir():
        write_dataloop_download(data_root, n_train, n_validation, seed=seed)
    subsets, reports = load_dataset(data_root)
    train, val = subsets["train"], subsets["validation"]
    training = Training(build_config(DEMO_CONFIG, {"seed": seed}, overrides), Splits(train, val, reports))
    training.model()  # random init under the seed: a demo run is reproducible
    queries = _sheet_queries(val, n=4)
    before = training.embed_validation()
    result = training.run(out / "model", progress=progress)
    after = training.embed_validation()

    files = {
        "model": out / "model",
        "metrics": out / "metrics.json",
        "curves": out / "training_curves.png",
        "search_sheet": out / "search_sheet.png",
    }
    files["metrics"].write_text(json.dumps(result.to_dict(), indent=2))
    plot_training_curves(result.history, files["curves"], before=result.before)
    relevant = [{p.image for p in val if p.caption == q} for q in queries]
    search_sheet(queries, _ranked(before, queries), _ranked(after, queries), relevant, files["search_sheet"])
    return DemoResult(format_table(result.before, result.after), result, out, files)


def _sheet_queries(val: list[CaptionPair], n: int) -> list[str]:
    """A few distinct validation captions, spread over the set."""
    captions = list(dict.fromkeys(p.caption for p in val))
    step = max(1, len(captions) // n)
    return captions[::step][:n]


def _ranked(emb: PairEmbeddings, queries: list[str], k: int = 5) -> list[list[str]]:
    """Top-k image paths per query, using the query captions' embeddings in `emb`."""
    texts = emb.text_features[[emb.captions.index(q) for q in queries]]
    idx, _ = top_k_by_dot(texts, emb.image_features, k)  # [n_queries, k]
    return [[emb.images[i] for i in row] for row in idx.tolist()]


def demo_config() -> FinetuneConfig:
    """The demo's configuration, validated (for docs and tests)."""
    return build_config(DEMO_CONFIG)
