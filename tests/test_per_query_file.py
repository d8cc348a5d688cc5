"""A trained model folder holds per_query.json next to metrics.json (training/loop.py): the per-query detail of
exactly the evaluation metrics.json reports (the best epoch's validation, or the test split when there is one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_TRAINING

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import Splits, load_dataset
from adapters.clip_finetune.data.synthetic import write_dataloop_download
from adapters.clip_finetune.retrieval.evaluation_result import PER_QUERY_NAME, EvaluationResult
from adapters.clip_finetune.training import finetune

TRAINING = {**TINY_TRAINING, "train_batch_size": 16, "batch_size": 64, "num_epochs": 1, "early_stopping": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_dataloop_download(root / "dev", 64, 24, seed=3)
    write_dataloop_download(root / "test", 0, 20, seed=4)
    dev, _ = load_dataset(root / "dev")
    test, _ = load_dataset(root / "test")
    return dev["train"], dev["validation"], test["validation"]


@pytest.mark.parametrize("with_test", [False, True])
def test_the_model_folder_holds_the_per_query_detail_of_its_reported_metrics(tiny_model_config: Path, data,
                                                                             tmp_path: Path, with_test) -> None:
    train, val, test = data
    cfg = build_config(TRAINING, {"model_name": str(tiny_model_config)})
    result = finetune(cfg, Splits(train, val, test=test if with_test else None), tmp_path / "model", progress=False)
    reported = json.loads((tmp_path / "model" / "metrics.json").read_text())["after"]
    per_query = EvaluationResult.read(tmp_path / "model" / PER_QUERY_NAME)
    assert reported == result.after and set(reported) <= set(per_query.metrics())
    assert {k: per_query.metrics()[k] for k in reported} == reported  # the same evaluation, to the last bit
    queries = {row["query"] for row in per_query.to_json()["text_to_image"]}
    assert queries == {p.caption for p in (test if with_test else val)}
