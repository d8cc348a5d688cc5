"""Hard-negative batches (`hard_negatives` N) against plain shuffled batches, scored on held-out images.

A learnable set of synthetic shapes (colour, shape, size, position, background), each image with two written
captions; held-out images are built the same way under another seed. Every condition trains the same tiny
architecture from the same seeded init with the same steps, learning rate, batch and epochs, and is scored at
its last epoch (no early stopping) with duplicate-aware relevance. The hard-negative runs also pay for their
mining (one embedding pass over the training data per epoch): their seconds include it.

    python -m bench.hard_negatives                          # 3 seeds x (plain, N=3): ~20 minutes on 2 busy cores
    python -m bench.hard_negatives --seeds 0 1 2 --hard 3 7 --json out.json

Prints a markdown table (docs/data.md, "Hard negatives").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from bench import duplicates
from bench.common import machine
from bench.duplicates import write_set

METRICS = ("text_to_image/recall@1", "text_to_image/recall@5", "text_to_image/mrr", "image_to_text/recall@1",
           "image_to_text/mrr")


def run(train: Path, validation: Path, hard: int, seed: int, epochs: int, batch: int) -> dict[str, float]:
    """bench.duplicates' run (the same recipe, the last epoch scored) with `hard_negatives` set."""
    return duplicates.run(train, validation, {"hard_negatives": hard, "base_eval_cache": False}, seed, epochs, batch,
                          METRICS)


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Mean ± sd over seeds of each metric and of the seconds a run took, one row per condition."""
    return duplicates.table(results, "batches", METRICS, seconds=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hard", type=int, nargs="+", default=[3], help="hard_negatives values besides 0")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=240, help="training images (2 captions each)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--from-json", help="print the table of an earlier run's --json file, train nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING)
    conditions = {"shuffled (hard_negatives 0)": 0, **{f"hard_negatives {n}": n for n in args.hard}}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in conditions}
    with tempfile.TemporaryDirectory(prefix="bench-hard-negatives-") as tmp:
        train = write_set(Path(tmp) / "train", args.images, 2, seed=101, title=False)
        validation = write_set(Path(tmp) / "validation", args.images // 3, 2, seed=202, title=False)
        for seed in args.seeds:
            for name, hard in conditions.items():
                results[name].append(run(train, validation, hard, seed, args.epochs, args.batch))
                print(f"seed {seed} {name}: {json.dumps(results[name][-1])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{machine()}, load average {load:.1f} at the end; {args.images} training images x 2 captions, "
          f"{args.images // 3} held-out images, {args.epochs} epochs, batch {args.batch}, seeds {args.seeds}; "
          "mean ± sd over seeds\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
