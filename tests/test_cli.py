"""The `clip-finetune` command line, called through main(argv) on small synthetic data.

The commands that need a trained model (evaluate, embed, search) use the run's shared one (conftest.trained_model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAINING, set_args
from PIL import Image

from adapters.clip_finetune.cli.demo import run_demo
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.data.images import PILLOW_MAX_IMAGE_PIXELS, set_max_image_pixels
from adapters.clip_finetune.data.synthetic import write_csv, write_dataloop_download
from adapters.clip_finetune.retrieval.store import load_embeddings


@pytest.fixture(scope="module")
def tiny_sets(tiny_model_config: Path) -> list[str]:
    return set_args({**TINY_TRAINING, "model_name": tiny_model_config})


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """A CSV table of 64 synthetic pairs, its PNGs in images/ beside it."""
    return write_csv(tmp_path_factory.mktemp("cli") / "pairs.csv", 64, seed=3)


def test_train_writes_a_loadable_artifact_and_prints_the_before_after_table(tmp_path, tiny_sets, capsys) -> None:
    data = write_dataloop_download(tmp_path / "data", 48, 24, seed=4)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), *tiny_sets, "--set", "num_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "recall@1" in out and "best epoch" in out
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "finetune_config.json", "metrics.json"} <= names
    assert json.loads((tmp_path / "m" / "finetune_config.json").read_text())["num_epochs"] == 1


def test_evaluate_prints_metrics_as_json(trained_model, table, capsys) -> None:
    out = trained_model.folder
    assert main(["evaluate", "--model", str(out), "--data", str(table), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["text_to_image/recall@1"] <= 1 and metrics["image_to_text/median_rank"] >= 1


def test_embed_images_writes_unit_vectors_with_their_paths(trained_model, table, tmp_path, capsys) -> None:
    out = trained_model.folder
    images = table.parent / "images"
    (images / "broken.png").write_bytes(b"not an image")  # skipped, not fatal
    index = tmp_path / "index.npz"
    assert main(["embed", "--model", str(out), "--images", str(images), "--out", str(index)]) == 0
    ids, vectors = load_embeddings(index)
    expected = sorted(str(p) for p in images.glob("*.png") if p.name != "broken.png")
    assert ids == expected and vectors.shape == (64, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert "wrote 64 vectors of 64 dimensions" in capsys.readouterr().out
    (images / "broken.png").unlink()


def test_search_finds_an_indexed_text_first_with_score_one(trained_model, tmp_path, capsys) -> None:
    out = trained_model.folder
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle on the left\na blue square at the top\na green ring in the middle\n")
    index = tmp_path / "texts.npz"
    assert main(["embed", "--model", str(out), "--texts", str(texts), "--out", str(index)]) == 0
    capsys.readouterr()
    # a texts index is refused for text-to-image search unless told (test_bad_input.py): here it is the point
    assert main(["search", "--model", str(out), "--index", str(index), "-k", "2", "--allow-mismatch",
                 "a blue square at the top"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a blue square at the top"
    assert lines[1].split()[1] == "1.0000" and lines[1].endswith("a blue square at the top")
    assert len(lines) == 3  # the query and k=2 results


def test_errors_are_one_clean_line(tmp_path, capsys) -> None:
    assert main(["evaluate", "--data", str(tmp_path / "nowhere"), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clip-finetune evaluate: error:") and "Traceback" not in err


def test_demo_writes_model_metrics_and_pictures(tmp_path) -> None:
    res = run_demo(tmp_path, n_train=96, n_validation=32, overrides={"num_epochs": 1, "num_workers": 0},
                   progress=False)
    assert "before" in res.table and "after" in res.table
    saved = json.loads(res.files["metrics"].read_text())
    assert set(saved) >= {"before", "after", "history", "best_epoch"}
    for name in ("curves", "search_sheet"):
        with Image.open(res.files[name]) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 150
    assert (res.files["model"] / "open_clip_model.safetensors").is_file()


def test_the_configured_pixel_limit_applies_to_embedding(trained_model, table, tmp_path, capsys) -> None:
    out = trained_model.folder
    try:
        rc = main(["embed", "--model", str(out), "--images", str(table.parent / "images"), "--out",
                   str(tmp_path / "none.npz"), "--set", "max_image_pixels=1000"])  # the 64x64 images are 4096 px
    finally:
        set_max_image_pixels(PILLOW_MAX_IMAGE_PIXELS)
    assert rc == 0 and "wrote 0 vectors" in capsys.readouterr().out


def test_evaluate_titles_its_one_column_by_what_it_evaluated(trained_model, table, capsys) -> None:
    out = trained_model.folder
    assert main(["evaluate", "--model", str(out), "--data", str(table)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["metric", "model"]


def test_a_run_no_epoch_of_which_beats_the_base_says_so_last(tmp_path, tiny_sets, capsys) -> None:
    data = write_dataloop_download(tmp_path / "data", 32, 16, seed=4)
    out = tmp_path / "m"
    assert main(["train", "--data", str(data), "--out", str(out), *tiny_sets, "--set", "num_epochs=1",
                 "--set", "learning_rate=1e-12"]) == 0  # a step this small changes no ranking
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("warning: no epoch beat the base model on text_to_image/mrr")
    assert "the saved weights are the base model's" in last and "raise learning_rate (now 1e-12" in last
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 0 and metrics["note"] == last.removeprefix("warning: ")
