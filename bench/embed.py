"""Embedding throughput and memory: this project's encode_images vs a plain open_clip loop vs the model alone.

On the same folder of large JPEGs, with the same model object, batch size and torch threads:
- plain loop: PIL open + convert, the model's preprocess, encode_image in batches (what most scripts do);
- ours: encode_images (JPEG draft decoding, inference_mode, the DataLoader of the CLI and the app);
- ours, draft off: the same without draft decoding (the effect of that one optimisation);
- limit: encode_image alone on ready, preprocessed tensors (no decoding at all).
Systems alternate within each repeat. Then peak RSS of ours embedding N items (N per --rss-items, small
JPEGs cycled, each count in its own process): streaming keeps it flat in N but for the [N, d] result.

    python -m bench.embed                  # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from bench.common import TINY_MODEL, cores, emit, load_spec, machine, markdown_table, parse_size, run_child, write_jpegs

SYSTEMS = ("plain loop", "ours", "ours, draft off", "limit")


def _load(model: str):
    from adapters.clip_finetune.config import FinetuneConfig
    from adapters.clip_finetune.model.clip import load_model

    name = str(TINY_MODEL) if model == "clip-tiny" else model
    return load_model(FinetuneConfig(model_name=name, pretrained=None, device="cpu"))


def plain_loop(clip, paths: list[str], batch_size: int):
    """What an open_clip user writes: PIL, the model's preprocess, encode_image per batch."""
    import torch
    from PIL import Image

    out = []
    clip.model.eval()
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = [clip.preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]]
            out.append(clip.model.encode_image(torch.stack(images), normalize=True))
    return torch.cat(out).numpy()


def forward_only(clip, ready, n: int, batch_size: int) -> None:
    import torch

    clip.model.eval()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            clip.model.encode_image(ready[: min(batch_size, n - start)], normalize=True)


def child_speed(spec: dict) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from adapters.clip_finetune.retrieval.embed import encode_images

    torch.set_num_threads(spec["threads"])
    clip = _load(spec["model"])
    paths, bs = spec["paths"], spec["batch"]
    ready = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in paths[:bs]])
    runs: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    jobs = {
        "plain loop": lambda: plain_loop(clip, paths, bs),
        "ours": lambda: encode_images(clip, paths, bs, spec["workers"], progress=False)[0],
        "ours, draft off": lambda: encode_images(clip, paths, bs, spec["workers"], progress=False, draft=False)[0],
        "limit": lambda: forward_only(clip, ready, len(paths), bs),
    }
    forward_only(clip, ready, bs, bs)  # warm-up
    vectors = {}
    for r in range(spec["repeats"]):
        for s in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
            t0 = time.perf_counter()
            vectors[s] = jobs[s]()
            runs[s].append(len(paths) / (time.perf_counter() - t0))
    cos = np.sum(vectors["ours"] * vectors["plain loop"], axis=1)  # both unit norm
    return {"images_per_s": runs, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def child_rss(spec: dict) -> dict:
    import torch

    from adapters.clip_finetune.retrieval.embed import encode_images
    from bench.common import peak_rss_mb

    torch.set_num_threads(spec["threads"])
    clip = _load(spec["model"])
    files = spec["paths"]
    paths = [files[i % len(files)] for i in range(spec["items"])]
    t0 = time.perf_counter()
    vectors, _ = encode_images(clip, paths, spec["batch"], spec["workers"], progress=False)
    return {"items": spec["items"], "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0,
            "result_mb": vectors.nbytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="clip-tiny,ViT-S-32,ViT-B-32",
                        help="comma-separated open_clip names / config JSONs (random init: speed only)")
    parser.add_argument("--images", type=int, default=128, help="distinct large JPEGs embedded per measurement")
    parser.add_argument("--image-size", default="1600x1200")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="ours: DataLoader workers (default: the "
                        "project's default for the machine)")
    parser.add_argument("--threads", type=int, default=cores(), help="torch threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rss-items", default="5000,50000", help="item counts for the peak-RSS runs ('' skips)")
    parser.add_argument("--rss-model", default="clip-tiny")
    parser.add_argument("--rss-image-size", default="320x240", help="JPEGs cycled in the RSS runs (small: fast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="keep the generated JPEGs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.child:
        spec = load_spec(args.child)
        emit(child_rss(spec) if spec["system"] == "rss" else child_speed(spec))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        w, h = parse_size(args.image_size)
        paths = [p for p, _ in write_jpegs(root / f"embed-{w}x{h}", args.images, args.seed, w, h)]
        mb = sum(Path(p).stat().st_size for p in paths) / len(paths) / 2**20
        base = {"batch": args.batch, "workers": args.workers, "threads": args.threads, "repeats": args.repeats}
        speed = {}
        for model in filter(None, args.models.split(",")):  # --models "": the RSS table only
            speed[model] = run_child("bench.embed", {**base, "system": "speed", "model": model, "paths": paths},
                                     args.threads)
            print(f"{model}: {json.dumps(speed[model])}", file=sys.stderr)
        rss = []
        if args.rss_items:
            rw, rh = parse_size(args.rss_image_size)
            small = [p for p, _ in write_jpegs(root / f"rss-{rw}x{rh}", 256, args.seed, rw, rh)]
            for n in (int(x) for x in args.rss_items.split(",")):
                rss.append(run_child("bench.embed", {**base, "system": "rss", "model": args.rss_model,
                                                     "paths": small, "items": n}, args.threads))
                print(f"rss {n}: {json.dumps(rss[-1])}", file=sys.stderr)
    print(report(speed, rss, args, argv, mb))
    return 0


def report(speed: dict, rss: list[dict], args: argparse.Namespace, argv: list[str] | None, mb: float) -> str:
    cmd = shlex.join(["python", "-m", "bench.embed", *(argv if argv is not None else sys.argv[1:])])
    if not speed:  # --models "": the peak-RSS table only, without an empty speed table
        out = [f"`{cmd}`: batch {args.batch}, {args.threads} torch threads.\nMachine: {machine()}"]
    else:
        out = [f"`{cmd}`: {args.images} JPEGs of {args.image_size} (mean {mb:.2f} MiB), batch {args.batch}, "
               f"{args.threads} torch threads, random-init weights (speed only), median of {args.repeats} "
               f"alternating runs.\nMachine: {machine()}\n"]
        rows = []
        for model, res in speed.items():
            ips = {s: median(v) for s, v in res["images_per_s"].items()}
            rows.append([model, f"{ips['plain loop']:.1f}", f"{ips['ours']:.1f}", f"{ips['ours, draft off']:.1f}",
                         f"{ips['limit']:.1f}", f"{ips['ours'] / ips['plain loop']:.2f}x",
                         f"{ips['ours'] / ips['limit']:.0%}", f"{res['min_cosine']:.4f}"])
        out.append(markdown_table(["model", "plain loop img/s", "ours img/s", "ours, draft off img/s",
                                   "limit (forward only) img/s", "ours / plain loop", "ours / limit",
                                   "min cosine ours vs plain"], rows))
    if rss:
        out.append(f"\nPeak RSS of `encode_images` ({args.rss_model}, {args.rss_image_size} JPEGs cycled), "
                   "each count in its own process:\n")
        out.append(markdown_table(["items", "peak RSS MiB", "of which the result vectors MiB", "seconds"],
                                  [[r["items"], f"{r['peak_rss_mb']:.0f}", f"{r['result_mb']:.1f}",
                                    f"{r['seconds']:.0f}"] for r in rss]))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
