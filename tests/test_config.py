"""The configuration model: defaults, derived embeddings_size, one clear line per bad field."""

from __future__ import annotations

import json

import pytest

from adapters.clip_finetune.cli.config_args import parse_set_options
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import (
    FinetuneConfig,
    build_config,
    metric_names,
    normalize_model_name,
)
from adapters.clip_finetune.errors import ConfigError


def test_defaults_follow_the_fine_tuning_recipes() -> None:
    cfg = FinetuneConfig()
    assert cfg.model_name == "ViT-B-32" and cfg.pretrained == "openai"
    assert cfg.embeddings_size == 512  # derived from the architecture, not hard-coded
    assert 1e-7 <= cfg.learning_rate <= 5e-6  # published CLIP fine-tuning recipes; higher rates collapse CLIP
    assert 1 <= cfg.num_epochs <= 5
    assert 0 < cfg.warmup < 1  # proportional to the run, not a fixed 10,000 steps
    assert cfg.weight_decay == pytest.approx(0.1)
    # training and embedding batch sizes are separate keys (the reference app shared one)
    assert build_config({"batch_size": 7}).train_batch_size == FinetuneConfig().train_batch_size


@pytest.mark.parametrize(
    ("name", "expected"),
    [("ViT-B/32", "ViT-B-32"), ("ViT-L/14@336px", "ViT-L-14-336"), ("ViT-B-16", "ViT-B-16"), ("x/y.json", "x/y.json")],
)
def test_reference_app_spelling_is_mapped(name: str, expected: str) -> None:
    assert normalize_model_name(name) == expected


def test_embeddings_size_follows_the_architecture(tiny_model_config) -> None:
    assert build_config({"model_name": "ViT-L-14"}).embeddings_size == 768
    assert build_config({"model_name": str(tiny_model_config), "pretrained": None}).embeddings_size == 64


def test_contradicting_embeddings_size_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"embeddings_size: 256 contradicts 'ViT-B-32'.*512"):
        build_config({"embeddings_size": 256})


@pytest.mark.parametrize(
    ("raw", "expected_line"),
    [
        ({"episilon": 1e-8}, "episilon: unknown key; did you mean 'epsilon'?"),
        ({"learning_rate": -1}, "learning_rate: Input should be greater than 0 (got -1)"),
        ({"num_epochs": "many"}, "num_epochs: Input should be a valid integer"),
        ({"betas": [0.9, 1.5]}, "betas: each beta must be in [0, 1) (got [0.9, 1.5])"),
        ({"precision": "fp8"}, "precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ({"warmup": 2.5}, "warmup: a warmup of 1 or more is a number of steps and must be whole (got 2.5)"),
        ({"early_stopping_metric": "text_to_image/recal@5"}, "did you mean 'text_to_image/recall@5'?"),
        ({"model_name": "ViT-B-33"}, "model_name: unknown architecture 'ViT-B-33'; did you mean"),
        ({"train_batch_size": 1}, "train_batch_size: Input should be greater than or equal to 2 (got 1)"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(raw: dict, expected_line: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert expected_line in str(err.value)


def test_every_bad_field_is_reported_once_on_its_own_line() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"episilon": 1, "learning_rate": 0, "num_epochs": 0})
    fields = [line.split(":")[0].strip() for line in str(err.value).splitlines()[1:]]
    assert sorted(fields) == ["episilon", "learning_rate", "num_epochs"]


def test_layers_later_wins_and_none_tags_mean_random_init(tiny_model_config) -> None:
    cfg = build_config({"learning_rate": 1e-5}, {"learning_rate": 2e-5, "pretrained": "none",
                                                 "model_name": str(tiny_model_config)})
    assert cfg.learning_rate == 2e-5 and cfg.pretrained is None


def test_set_options_parse_json_values() -> None:
    assert parse_set_options(["num_epochs=3", "betas=[0.9,0.99]", "pretrained=none", "precision=bf16"]) == {
        "num_epochs": 3, "betas": [0.9, 0.99], "pretrained": "none", "precision": "bf16"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set_options(["num_epochs"])


def test_metric_names_cover_both_directions() -> None:
    names = metric_names()
    assert "text_to_image/recall@1" in names and "image_to_text/mrr" in names
    assert len(names) == 2 * (5 * 3 + 5)


def test_cli_rejects_a_typo_before_any_work(tmp_path, capsys) -> None:
    rc = main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m"),
               "--set", "episilon=1e-8"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "episilon: unknown key; did you mean 'epsilon'?" in err
    assert not (tmp_path / "m").exists()


def test_cli_config_prints_the_merged_defaults(tmp_path, capsys) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"num_epochs": 3}))
    assert main(["config", "--config", str(f), "--set", "learning_rate=2e-6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # embeddings_size is derived from model_name: printed as null, so the output stays a valid --config when
    # model_name is edited (tests/test_first_hour_again.py)
    assert printed["num_epochs"] == 3 and printed["learning_rate"] == 2e-6 and printed["embeddings_size"] is None


def test_a_saved_models_missing_architecture_file_is_only_an_error_when_it_is_needed(tmp_path) -> None:
    gone = {"model_name": str(tmp_path / "trained-elsewhere.json"), "pretrained": None}
    with pytest.raises(ConfigError, match="trained-elsewhere.json' does not exist"):
        build_config(gone)
    cfg = build_config(gone, saved_model=True)  # its artifact holds the architecture
    assert cfg.model_name.endswith("trained-elsewhere.json") and cfg.embeddings_size is None
