"""Issue 24, round 3 of bad input on the surfaces: the Python API's arguments, label templates, devices, texts
files, the hub's endpoint port, doctor, and a full disk while saving. Each case ends as the package's error naming
the input, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_MODEL, TINY_TRAINING

from adapters.clip_finetune.api import encode, fit, get_model
from adapters.clip_finetune.api.run import Run
from adapters.clip_finetune.api.run_folder import RunError, create_run, update_state
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.errors import ConfigError, DataError
from adapters.clip_finetune.model.clip import load_model, save_artifact


@pytest.mark.parametrize("model", [None, 5, ""])
def test_fit_names_a_model_that_is_not_one(tmp_path: Path, model: object) -> None:
    with pytest.raises(ConfigError, match="^model: expected an open_clip architecture name"):
        fit(model, [("a.png", "a cat")], runs_dir=tmp_path / "runs")  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()  # before any work: no run folder


def test_fit_without_train_data_is_refused_before_a_run_starts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="^train_data: required"):
        fit(str(TINY_MODEL), None, runs_dir=tmp_path / "runs")  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    folder = save_artifact(load_model(cfg), tmp_path_factory.mktemp("model") / "model", cfg)
    return get_model(folder, "clip-text")


@pytest.mark.parametrize("data", [None, 5, b"bytes"])
def test_encode_names_data_that_is_not_texts_or_images(text_encoder, data: object) -> None:
    with pytest.raises(DataError, match="^encode: data must be a text, an image"):
        encode(text_encoder, data)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "8"])
def test_encode_refuses_a_batch_size_below_one(text_encoder, batch_size: object) -> None:
    with pytest.raises(ConfigError, match="^encode: batch_size must be a whole number of at least 1"):
        encode(text_encoder, ["a cat"], batch_size=batch_size)  # type: ignore[arg-type]
    assert encode(text_encoder, ["a cat", "a dog"], batch_size=1).shape == (2, text_encoder.embed_dim)


@pytest.mark.parametrize("artifact", [None, 5, ""])
def test_get_model_names_an_artifact_that_is_not_one(artifact: object) -> None:
    with pytest.raises(ConfigError, match="^artifact: expected a saved model folder or a finished Run"):
        get_model(artifact, "clip-text")  # type: ignore[arg-type]


def test_save_artifact_onto_its_own_folder_is_refused(tmp_path: Path) -> None:
    run_dir = create_run(tmp_path / "runs", "done", {"config": {}})
    update_state(run_dir, status="finished")
    (run_dir / "model").mkdir()
    (run_dir / "model" / "weights").write_text("w")
    for target in (run_dir / "model", run_dir / "model" / "copy", run_dir, tmp_path / "runs"):
        with pytest.raises(RunError, match="the run's own model folder, inside it or a folder holding it"):
            Run(run_dir).save_artifact(target, overwrite=True)
    assert sorted(p.name for p in (run_dir / "model").iterdir()) == ["weights"]  # nothing copied into itself
    assert (Run(run_dir).save_artifact(tmp_path / "elsewhere") / "weights").read_text() == "w"
