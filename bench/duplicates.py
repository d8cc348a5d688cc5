"""The duplicate-aware loss against open_clip's plain ClipLoss, on data where batches hold false negatives.

A learnable set of synthetic shapes where each image has several captions (prompt items give one pair per
caption) and a short product-like title that several images share ("red circle"): the plain loss pushes a
batch's other captions of the same image, and other images with the same title, apart as negatives. Every
condition trains the same tiny architecture from the same seeded init, with the same steps, learning rate,
batch and epochs, and is scored at its last epoch (no early stopping) on held-out images built the same way,
with duplicate-aware relevance (docs/metrics.md). Three seeds (init and batch order); the data is fixed.

    python -m bench.duplicates                     # ~10 minutes on 2 CPU cores
    python -m bench.duplicates --seeds 0 1 2 --epochs 6 --json out.json

Prints a markdown table (docs/data.md, "Duplicate-aware loss").
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev

from bench.common import TINY_MODEL, machine, markdown_table

CONDITIONS = {  # name: the configuration keys that differ
    "plain ClipLoss": {"duplicate_aware_loss": False, "unique_batches": False},
    "duplicate-aware": {"duplicate_aware_loss": True, "unique_batches": False},
    "duplicate-aware + unique batches": {"duplicate_aware_loss": True, "unique_batches": True},
}
METRICS = ("text_to_image/recall@1", "text_to_image/recall@5", "text_to_image/mrr", "image_to_text/recall@1",
           "image_to_text/recall@5", "image_to_text/mrr")


def write_set(folder: Path, n_images: int, captions: int, seed: int, title: bool = True) -> Path:
    """A CSV of `n_images` shapes, each with `captions` distinct captions plus (`title`) its shared title ('red
    circle')."""
    from adapters.clip_finetune.data.synthetic import render, sample_specs

    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "pairs.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "filepath", "caption"])
        for i, sample in enumerate(sample_specs(n_images, seed, captions_per_image=captions)):
            name = f"{i:05d}.png"
            render(sample).save(folder / name)
            titles = (f"{sample.attributes['colour']} {sample.attributes['shape']}",) if title else ()
            for j, caption in enumerate((*sample.captions, *titles)):
                writer.writerow([f"{folder.name}-{i}-{j}", name, caption])  # ids are compared across tables
    return table


def run(train: Path, validation: Path, condition: dict, seed: int, epochs: int, batch: int,
        metrics: tuple[str, ...] = METRICS) -> dict[str, float]:
    from adapters.clip_finetune.config import build_config
    from adapters.clip_finetune.data.load import load_splits
    from adapters.clip_finetune.training import finetune

    cfg = build_config({"model_name": str(TINY_MODEL), "pretrained": None, "learning_rate": 1e-3,
                        "train_batch_size": batch, "num_epochs": epochs, "early_stopping": False, "num_workers": 0,
                        "batch_size": 256, "seed": seed, **condition})
    splits = load_splits(train, validation, cfg=cfg)
    t0 = time.perf_counter()
    result = finetune(cfg, splits, progress=False)
    last = result.history[-1]  # the same budget for every condition: the last epoch, not a selected one
    return {**{m: last[m] for m in metrics}, "seconds": time.perf_counter() - t0}


def table(results: dict[str, list[dict[str, float]]], first: str = "loss", metrics: tuple[str, ...] = METRICS,
          seconds: bool = False) -> str:
    """Mean ± sd over seeds of each metric (and, with `seconds`, of the seconds a run took), one row per
    condition."""
    def cell(runs: list[dict[str, float]], m: str, digits: int = 3) -> str:
        sd = stdev(r[m] for r in runs) if len(runs) > 1 else 0
        return f"{mean(r[m] for r in runs):.{digits}f} ± {sd:.{digits}f}"

    extra = ["seconds"] if seconds else []
    return markdown_table([first, *metrics, *extra],
                          [[name, *(cell(runs, m) for m in metrics), *(cell(runs, "seconds", 0) for _ in extra)]
                           for name, runs in results.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=300, help="training images (each with --captions + a title)")
    parser.add_argument("--captions", type=int, default=4, help="written captions per image")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--from-json", help="print the table of an earlier run's --json file, train nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONDITIONS}
    with tempfile.TemporaryDirectory(prefix="bench-duplicates-") as tmp:
        train = write_set(Path(tmp) / "train", args.images, args.captions, seed=101)
        validation = write_set(Path(tmp) / "validation", args.images // 4, args.captions, seed=202)
        for seed in args.seeds:
            for name, condition in CONDITIONS.items():
                results[name].append(run(train, validation, condition, seed, args.epochs, args.batch))
                print(f"seed {seed} {name}: {json.dumps(results[name][-1])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\n{machine()}; {args.images} training images x {args.captions + 1} captions (one a shared title), "
          f"{args.epochs} epochs, batch {args.batch}, seeds {args.seeds}; mean ± sd over seeds\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
