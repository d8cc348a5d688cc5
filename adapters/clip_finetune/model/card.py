"""The model card: README.md in a saved model folder, in Hugging Face's model-card format (YAML metadata, then
Markdown), written from what the folder itself records (open_clip_config.json, finetune_config.json,
metrics.json, data_report.json), so it is true of the weights beside it.

What it holds (https://huggingface.co/docs/hub/model-cards): the base model, the data as counts (never its
contents: captions and file names stay private), the recipe, the metrics before and after and which split they
were scored on, the retention result where one was measured, intended use and limits, and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import atomic_write
from ..inputs import MAX_JSON_BYTES, Unreadable, read_json

CARD_NAME = "README.md"
HEADLINE = ("text_to_image/recall@1", "text_to_image/recall@5", "text_to_image/recall@10", "text_to_image/mrr",
            "image_to_text/recall@1", "image_to_text/recall@5")
RECIPE = ("learning_rate", "num_epochs", "train_batch_size", "weight_decay", "warmup", "precision",
          "lock_image", "lock_text", "wise_ft_alpha", "loss", "seed")


def _read(folder: Path, name: str) -> dict[str, Any]:
    """One of the folder's JSON files, or {} when it is missing or unreadable (the card says less, never fails)."""
    try:
        data = read_json(folder / name, MAX_JSON_BYTES) if (folder / name).is_file() else {}
    except Unreadable:
        return {}
    return data if isinstance(data, dict) else {}


# the Hub's metadata keys; `base_model` is left out: open_clip's pretrained tags ("openai") are not Hub repo ids
FRONT_MATTER = "\n".join(["---", "library_name: open_clip", "license: other",
                          "pipeline_tag: zero-shot-image-classification",
                          "tags:", "- clip", "- open_clip", "- text-to-image-retrieval", "- clip-finetune", "---", ""])


def _data_section(report: dict[str, Any]) -> list[str]:
    if not report:
        return ["No data report was saved with this model."]
    rows = ["| split | pairs used | skipped |", "|---|---|---|"]
    for split, r in report.items():
        if isinstance(r, dict):
            skipped = r.get("skipped", {})
            n_skipped = sum(skipped.values()) if isinstance(skipped, dict) else skipped
            rows.append(f"| {split} | {r.get('used', '?')} | {n_skipped} |")
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "–"


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    if not after:
        return ["No evaluation was recorded (the model was saved during or without training)."]
    scored_on = metrics.get("scored_on", "selection")
    where = {"test": "the test split, scored once at the end (never used to choose)",
             "selection": "the selection set that picked the best epoch (which flatters 'after')"}.get(
                 scored_on, scored_on)
    rows = [f"Scored on {where}.", "", "| metric | base model | fine-tuned |", "|---|---|---|"]
    rows += [f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in HEADLINE if k in after]
    if metrics.get("best_epoch") is not None:
        rows += ["", f"Best epoch: {metrics['best_epoch']}."]
    if metrics.get("note"):
        rows += ["", f"Note: {metrics['note']}"]
    return rows


def _retention_section(metrics: dict[str, Any]) -> list[str]:
    retention = metrics.get("retention")
    if not isinstance(retention, dict) or not retention:
        return ["No retention set was measured: nothing shows what the base model knew beyond this data and kept. "
                "Measure one before relying on this model outside its training domain."]
    return ["```json", json.dumps(retention, indent=2, sort_keys=True)[:4000], "```"]


def render_card(folder: str | Path) -> str:
    """The card's text for a saved model folder."""
    folder = Path(folder)
    cfg, metrics = _read(folder, "finetune_config.json"), _read(folder, "metrics.json")
    report = _read(folder, "data_report.json")
    base = cfg.get("model_name", "an open_clip architecture")
    weights = cfg.get("pretrained") or "random init (no pretrained weights)"
    if isinstance(metrics.get("wise_ft_alpha"), int | float):  # the alpha shipped (auto WiSE-FT picks it)
        cfg = {**cfg, "wise_ft_alpha": metrics["wise_ft_alpha"]}
    recipe = [f"| {k} | `{json.dumps(cfg[k])}` |" for k in RECIPE if k in cfg]
    lines = [
        FRONT_MATTER, f"# {folder.resolve().name}", "",
        f"A CLIP model fine-tuned for text-to-image search with clip-finetune, from `{base}` "
        f"(weights: `{weights}`).", "",
        "## Data", "", "Counts only; the captions and images are not part of this card.", "",
        *_data_section(report), "",
        "## Training recipe", "", "| setting | value |", "|---|---|", *recipe, "",
        "The whole configuration is in `finetune_config.json`.", "",
        "## Evaluation", "", *_metrics_section(metrics), "",
        "## Retention", "", *_retention_section(metrics), "",
        "## Intended use and limits", "",
        "Text-to-image and image-to-text retrieval on data like the training data above. Fine-tuning on a narrow "
        "domain can make the model worse elsewhere; the figures above hold for the data they were scored on. "
        "It inherits the biases of its base model and of its training captions.", "",
        "## How to load", "", "```python", "import open_clip", "",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH_TO_THIS_FOLDER")',
        'tokenizer = open_clip.get_tokenizer("local-dir:PATH_TO_THIS_FOLDER")', "```", "",
        "From the Hugging Face Hub: `hf-hub:OWNER/REPO` in place of `local-dir:PATH_TO_THIS_FOLDER`.", "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path) -> Path:
    """Write (or rewrite) README.md in a saved model folder, atomically."""
    path = Path(folder) / CARD_NAME
    text = render_card(folder)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path
