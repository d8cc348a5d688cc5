"""The model card (README.md) every saved model gets: Hugging Face's format, counts but no contents, the recipe,
the figures as metrics.json holds them, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import TINY_MODEL

from adapters.clip_finetune.config import FinetuneConfig
from adapters.clip_finetune.model.card import write_model_card
from adapters.clip_finetune.model.clip import load_model, save_artifact

SECRET_CAPTION = "the secret caption of item 17"


def _saved(tmp_path: Path) -> Path:
    cfg = FinetuneConfig(model_name=str(TINY_MODEL), pretrained=None, learning_rate=2e-3, num_epochs=4)
    metrics = {"before": {"text_to_image/recall@5": 0.03125, "text_to_image/mrr": 0.05},
               "after": {"text_to_image/recall@5": 0.40625, "text_to_image/mrr": 0.25},
               "best_epoch": 3, "scored_on": "test"}
    return save_artifact(load_model(cfg, "cpu"), tmp_path / "model", cfg, metrics)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_every_saved_model_has_a_card_in_the_hubs_format_with_its_figures(tmp_path: Path) -> None:
    card = (_saved(tmp_path) / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "open_clip" and "text-to-image-retrieval" in meta["tags"]
    assert "| text_to_image/recall@5 | 0.0312 | 0.4062 |" in card  # as metrics.json holds them
    assert "test split, scored once at the end" in card and "Best epoch: 3." in card
    assert "| learning_rate | `0.002` |" in card and "| num_epochs | `4` |" in card
    assert str(TINY_MODEL) in card and "random init" in card
    assert 'create_model_and_transforms("local-dir:' in card
    assert "No retention set was measured" in card


def test_the_card_counts_the_data_and_never_shows_it(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    report = {"train": {"used": 480, "skipped": {"undecodable": 3, "no caption": 2},
                        "examples": [f"items/{SECRET_CAPTION}.png"]},
              "validation": {"used": 60, "skipped": {}, "examples": []}}
    (model / "data_report.json").write_text(json.dumps(report))
    card = write_model_card(model).read_text()
    assert "| train | 480 | 5 |" in card and "| validation | 60 | 0 |" in card
    assert SECRET_CAPTION not in card


def test_a_damaged_metrics_file_gives_a_shorter_card_not_an_error(tmp_path: Path) -> None:
    model = _saved(tmp_path)
    (model / "metrics.json").write_text("{not json")
    card = write_model_card(model).read_text()
    assert "No evaluation was recorded" in card and _front_matter(card)["library_name"] == "open_clip"
