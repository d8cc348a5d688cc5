"""Does fusing an item's description with its image beat image-only and text-only retrieval?

Trains the tiny CLIP briefly on synthetic captions (the Python API, foreground), then searches held-out
items that each have an image AND a description (a second, different caption of the same image) with a
third party's words: the item's other caption as the query. Compares text->image R@1, R@5 and MRR of
image-only, description-only, weighted-sum and z-score fusion (bench/fusion.py), on two held-out sets: alphas
are picked on `dev`, reported on `test`. Prints a markdown table (docs/search.md quotes it).

    python bench/hybrid_search.py            # about 1.5 minutes on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from adapters.clip_finetune.api import encode, fit, get_model
from adapters.clip_finetune.data.synthetic import render, sample_specs, write_dataloop_download
from adapters.clip_finetune.retrieval.metrics import ranking_metrics
from bench.fusion import fuse

TINY_MODEL = Path(__file__).resolve().parents[1] / "adapters" / "clip_finetune" / "model_configs" / "clip-tiny.json"
ALPHAS = (0.1, 0.25, 0.5, 0.75, 0.9)  # weight of the description score; the image score gets 1 - alpha


def held_out(n: int, seed: int) -> tuple[list, list[str], list[str]]:
    """n items: image, description (caption 2) and query (caption 1, another template)."""
    specs = sample_specs(n, seed, captions_per_image=2)
    return [render(s) for s in specs], [s.captions[1] for s in specs], [s.captions[0] for s in specs]


def score_lists(run, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(query-description cosines, query-image cosines), each [n_queries, n_items]; query i is item i's."""
    images, descriptions, queries = held_out(n, seed)
    text, vision = get_model(run, "clip-text"), get_model(run, "clip-vision")
    q = encode(text, queries, batch_size=256)
    return q @ encode(text, descriptions, batch_size=256).T, q @ encode(vision, images, batch_size=128).T


def measure(text_scores: np.ndarray, image_scores: np.ndarray, method: str, alpha: float) -> dict[str, float]:
    relevance = np.eye(len(text_scores), dtype=bool)  # one relevant item: the query's own
    m = ranking_metrics(fuse(text_scores, image_scores, method, alpha), relevance, ks=(1, 5))  # type: ignore[arg-type]
    return {"R@1": m["recall@1"], "R@5": m["recall@5"], "MRR": m["mrr"]}


def reciprocal_ranks(scores: np.ndarray) -> np.ndarray:
    """1 / rank of each query's own item (query i <-> item i), ties pessimistic as in metrics.py."""
    own = np.diag(scores)[:, None]
    return 1.0 / ((scores > own).sum(axis=1) + (scores == own).sum(axis=1))


def paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over queries and its 95% bootstrap interval (queries resampled, pairs kept)."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--items", type=int, default=500, help="held-out items per set (dev and test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataloop_download(Path(tmp) / "data", args.train, 100, seed=args.seed)
        run = fit(model=TINY_MODEL, train_data=data, wait=True, runs_dir=Path(tmp) / "runs", pretrained=None,
                  learning_rate=1e-3, train_batch_size=32, num_epochs=args.epochs, early_stopping=False,
                  num_workers=0, batch_size=128, seed=args.seed)
        train_seconds = time.perf_counter() - t0
        sets = {name: score_lists(run, args.items, 1000 + i) for i, name in enumerate(("dev", "test"))}
    rows = [("image only", "weighted", 0.0), ("description only", "weighted", 1.0)]
    rows += [("weighted sum", "weighted", a) for a in ALPHAS] + [("z-score", "zscore", a) for a in ALPHAS]
    results = {(label, a): {s: measure(*sets[s], method, a) for s in sets} for label, method, a in rows}
    best = {label: max((r for r in results if r[0] == label), key=lambda r: results[r]["dev"]["MRR"])
            for label in ("weighted sum", "z-score")}

    text_s, image_s = sets["test"]
    print(f"Held-out test set: {args.items} items (image + description), {args.items} queries; tiny CLIP trained "
          f"{args.epochs} epochs on {args.train} synthetic pairs.\n")
    print("| fusion | alpha (description weight) | R@1 | R@5 | MRR | dev MRR |")
    print("|---|---|---|---|---|---|")
    for (label, a), r in results.items():
        mark = " (best on dev)" if best.get(label) == (label, a) else ""
        t, d = r["test"], r["dev"]
        print(f"| {label}{mark} | {a:g} | {t['R@1']:.3f} | {t['R@5']:.3f} | {t['MRR']:.3f} | {d['MRR']:.3f} |")
    print("\nTest MRR difference, dev-picked fusion minus each single list (mean, 95% paired bootstrap interval):")
    single = {"image only": image_s, "description only": text_s}
    for label, method in (("weighted sum", "weighted"), ("z-score", "zscore")):
        fused = reciprocal_ranks(fuse(text_s, image_s, method, best[label][1]))  # type: ignore[arg-type]
        for name, scores in single.items():
            mean, lo, hi = paired_ci(fused, reciprocal_ranks(scores))
            print(f"- {label} (alpha {best[label][1]:g}) - {name}: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    # What a scale gap does (jina-clip-v1's case), simulated: the same description scores squeezed into
    # 0.8 + 0.05 * s, an order-preserving affine map. z-score fusion is invariant to it; the plain sum is not.
    squeezed = 0.8 + 0.05 * text_s
    print("\nSimulated scale gap, test MRR with description cosines squeezed to 0.8 + 0.05 * cosine:")
    for a in (0.5, 0.75):
        print(f"- alpha {a:g}: weighted sum {measure(squeezed, image_s, 'weighted', a)['MRR']:.3f} (unsqueezed "
              f"{results[('weighted sum', a)]['test']['MRR']:.3f}), z-score "
              f"{measure(squeezed, image_s, 'zscore', a)['MRR']:.3f} (unsqueezed "
              f"{results[('z-score', a)]['test']['MRR']:.3f})")
    print("\nScales on the test set (mean over queries of each candidate list's mean / std):")
    print(f"- query-description cosine: mean {text_s.mean():.3f}, std {text_s.std(axis=1).mean():.3f}")
    print(f"- query-image cosine: mean {image_s.mean():.3f}, std {image_s.std(axis=1).mean():.3f}")
    print(f"\n`python {' '.join(['bench/hybrid_search.py', *sys.argv[1:]])}`: {time.perf_counter() - t0:.0f} s "
          f"(training {train_seconds:.0f} s) on {platform.machine()} with {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
