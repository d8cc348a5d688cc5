"""Never worse than the base: auto WiSE-FT against plain fine-tuning, on a base that knows a first domain.

A pretrained-like base is stood in by the tiny architecture trained from random init on domain A (synthetic.py's
coloured shapes); it is then fine-tuned on domain B (patterns.py's stripes, checks, dots and grids: other images,
other words, the same colour names) twice from the same weights and seed: plain (wise_ft_auto false) and with
auto WiSE-FT, whose retention set is held-out A pairs. Three models are then scored on A's and B's test pairs,
which chose nothing: A's retrieval must stay within a point of the base (the tolerance), and auto WiSE-FT should
keep at least half of plain fine-tuning's gain on B.

Each fine-tuning learning rate in --tune-lr runs plain and auto from the same base. The default pair: 5e-4, half
the base's own rate (an aggressive fine-tune, which forgets), and 5e-5, a twentieth of it (nearer the published
CLIP recipes, which fine-tune at 1e-7 to 5e-6 after pre-training at ~5e-4: ANCHORS.md).

    python -m bench.never_worse            # prints a markdown table per learning rate
    python -m bench.never_worse --json     # the numbers as one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import TINY_MODEL, machine, markdown_table

METRIC = "text_to_image/mrr"
SHOWN = ("text_to_image/recall@1", "text_to_image/recall@5", "text_to_image/mrr", "image_to_text/mrr")
BASE = {"model_name": str(TINY_MODEL), "pretrained": None, "learning_rate": 1e-3, "train_batch_size": 32,
        "batch_size": 128, "num_workers": 0, "num_epochs": 8, "warmup": 0.1, "early_stopping": False, "seed": 0}
TUNE = {"num_epochs": 4, "warmup": 0.1, "early_stopping": False}
TUNE_LRS = (5e-4, 5e-5)  # half the base's learning rate (aggressive), and a twentieth (nearer CLIP's recipes)
SIZES = {"a_train": 1200, "a_retention": 200, "a_test": 300, "b_train": 600, "b_validation": 150, "b_test": 300}


def write_data(root: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """One table per set, each with its own images (different seeds: no image is in two sets)."""
    from adapters.clip_finetune.data.patterns import write_pattern_csv
    from adapters.clip_finetune.data.synthetic import write_csv

    paths = {}
    for seed, (name, n) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        write = write_csv if name.startswith("a_") else write_pattern_csv
        paths[name] = write(root / name / f"{name}.csv", n, seed=100 + seed)
    return paths


def train(cfg: dict[str, Any], data: dict[str, Path], out: Path, train_set: str, validation: str,
          retention: str | None = None) -> tuple[dict[str, Any], float]:
    from adapters.clip_finetune.app.train import training_of
    from adapters.clip_finetune.config import build_config

    started = time.perf_counter()
    training = training_of(build_config(cfg), data[train_set], data[validation],
                           retention=data[retention] if retention else None)
    result = training.run(out, progress=False).to_dict()
    return result, time.perf_counter() - started


def score(folder: Path, table: Path) -> dict[str, float]:
    from adapters.clip_finetune.app.evaluate import score as evaluate
    from adapters.clip_finetune.config import build_config
    from adapters.clip_finetune.data.tables import read_table
    from adapters.clip_finetune.model.clip import load_artifact

    return evaluate(load_artifact(folder, "cpu"), read_table(table), build_config(BASE))


def run(root: Path, tune_lrs: tuple[float, ...] = TUNE_LRS) -> dict[str, Any]:
    data = write_data(root, SIZES)
    _, base_seconds = train(BASE, data, root / "base", "a_train", "a_retention")
    base_scores = {"A": score(root / "base", data["a_test"]), "B": score(root / "base", data["b_test"])}
    runs = [tune(root, data, base_scores, lr) for lr in tune_lrs]
    return {"sizes": SIZES, "metric": METRIC, "base_scores": base_scores, "base_seconds": base_seconds,
            "runs": runs, "machine": machine()}


def tune(root: Path, data: dict[str, Path], base_scores: dict[str, Any], lr: float) -> dict[str, Any]:
    """Plain and auto WiSE-FT fine-tuning of the base on B at learning rate `lr`, scored on A and B."""
    tuned = {**BASE, **TUNE, "learning_rate": lr, "pretrained": str(root / "base"),
             "model_name": str(root / "base" / "open_clip_config.json")}
    plain, plain_seconds = train({**tuned, "wise_ft_auto": False}, data, root / f"plain-{lr:g}", "b_train",
                                 "b_validation", "a_retention")
    auto, auto_seconds = train(tuned, data, root / f"auto-{lr:g}", "b_train", "b_validation", "a_retention")
    scores = {"base": base_scores, **{name: {"A": score(root / f"{name}-{lr:g}", data["a_test"]),
                                             "B": score(root / f"{name}-{lr:g}", data["b_test"])}
                                      for name in ("plain", "auto")}}
    a = {name: s["A"][METRIC] for name, s in scores.items()}
    b = {name: s["B"][METRIC] for name, s in scores.items()}
    gain = b["plain"] - b["base"]
    return {"learning_rate": lr, "scores": scores, "alpha": auto["wise_ft_alpha"], "curve": auto["wise_ft_curve"],
            "sweep_seconds": auto["wise_ft_seconds"], "seconds": {"plain": plain_seconds, "auto": auto_seconds},
            "a_drop_plain": a["base"] - a["plain"], "a_drop_auto": a["base"] - a["auto"],
            "b_gain_plain": gain, "b_gain_auto": b["auto"] - b["base"],
            "kept_fraction": (b["auto"] - b["base"]) / gain if gain > 0 else float("nan")}


def report(result: dict[str, Any]) -> str:
    headers = ["model", *(f"{d}: {m.replace('text_to_image/', 't→i ').replace('image_to_text/', 'i→t ')}"
                          for d in ("A", "B") for m in SHOWN)]
    parts = []
    for r in result["runs"]:
        rows = [[name, *(f"{r['scores'][name][d][m]:.3f}" for d in ("A", "B") for m in SHOWN)]
                for name in ("base", "plain", "auto")]
        curve = ", ".join(f"{p['alpha']:g}: {p['target']:.3f}/{p['retention']:.3f}" for p in r["curve"])
        parts += [
            f"fine-tuning learning rate {r['learning_rate']:g}:", "", markdown_table(headers, rows), "",
            f"auto WiSE-FT shipped alpha {r['alpha']:g}; A {METRIC} change: plain {-r['a_drop_plain']:+.3f}, auto "
            f"{-r['a_drop_auto']:+.3f}; B gain: plain {r['b_gain_plain']:+.3f}, auto {r['b_gain_auto']:+.3f} "
            f"(kept {r['kept_fraction']:.0%})",
            f"curve (alpha: B validation / A retention {METRIC}): {curve}",
            f"seconds: plain {r['seconds']['plain']:.0f}, auto {r['seconds']['auto']:.0f} (of which the sweep "
            f"{r['sweep_seconds']:.0f})", ""]
    return "\n".join([*parts, f"base: {result['base_seconds']:.0f} s; {result['machine']}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.never_worse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--tune-lr", default=",".join(f"{lr:g}" for lr in TUNE_LRS),
                        help="fine-tuning learning rates, comma-separated, each run plain and auto from the same base "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="never-worse-") as tmp:
        result = run(Path(tmp), tuple(float(x) for x in args.tune_lr.split(",") if x))
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
