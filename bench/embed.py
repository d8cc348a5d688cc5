"""Embedding throughput and memory: this project's encode_images vs a plain open_clip loop vs the model alone.

In one process, on the same folder of large JPEGs, with the same model object, batch size and torch threads:
- plain loop: PIL open + convert, the model's preprocess, encode_image in batches (what most scripts do);
- ours: encode_images (JPEG draft decoding, decode threads, inference_mode), fp32; then with draft decoding off,
  with bf16 autocast, with torch.compile (the image tower; compile time reported apart);
- limit: encode_image alone on ready, preprocessed tensors (no decoding at all), fp32 and bf16.
Systems alternate within each repeat. Then the whole process, as a user runs it from the shell: the plain loop
as a script (bench/plain_embed.py) vs `clip-finetune embed`, on --whole-images JPEGs, beside the start-up alone
(`import torch, open_clip`); where an image's time goes in ours (decode, resize, tensor, forward, writing); and
peak RSS of ours embedding N items (N per --rss-items, small JPEGs cycled, each count in its own process).

    python -m bench.embed                  # about 15 minutes on 2 CPU cores
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

from bench.common import (
    ROOT,
    TINY_MODEL,
    cores,
    machine,
    markdown_table,
    parse_size,
    run_child,
    serve_child,
    write_jpegs,
)

SYSTEMS = ("plain loop", "ours", "ours, draft off", "ours, bf16", "ours, compile", "limit", "limit, bf16")


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


def forward_only(clip, ready, n: int, batch_size: int, bf16: bool = False) -> None:
    import torch

    clip.model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, n, batch_size):
            clip.model.encode_image(ready[: min(batch_size, n - start)], normalize=True)


def _bf16(on: bool) -> None:
    """Embedding in bf16 autocast, or in its default precision (fp32 on a CPU)."""
    import adapters.clip_finetune.retrieval.embed as embed
    from adapters.clip_finetune.model.precision import autocast_for

    embed.autocast_for = lambda device, precision: autocast_for(device, "bf16" if on else precision)


def _compiled_copy(clip, batch: int) -> tuple[object, float]:
    """A copy of `clip` whose image tower is compiled, and the seconds the first (compiling) call took."""
    import copy
    import dataclasses

    import torch

    from adapters.clip_finetune.model.compiling import compile_module

    other = dataclasses.replace(clip, model=copy.deepcopy(clip.model))
    compile_module(other.model.visual, "the image tower")
    t0 = time.perf_counter()
    with torch.inference_mode():
        other.model.encode_image(torch.zeros(batch, 3, *_side(clip)))
    return other, time.perf_counter() - t0


def _side(clip) -> tuple[int, int]:
    from adapters.clip_finetune.data.decode_cache import transform_size

    side = transform_size(clip.preprocess)
    return side, side


def child_speed(spec: dict) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from adapters.clip_finetune.retrieval.embed import encode_images

    torch.set_num_threads(spec["threads"])
    clip = _load(spec["model"])
    compiled, compile_s = _compiled_copy(clip, spec["batch"])
    paths, bs, workers = spec["paths"], spec["batch"], spec["workers"]
    ready = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in paths[:bs]])
    runs: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    jobs = {  # (bf16 in embedding, job)
        "plain loop": (False, lambda: plain_loop(clip, paths, bs)),
        "ours": (False, lambda: encode_images(clip, paths, bs, workers, progress=False)[0]),
        "ours, draft off": (False, lambda: encode_images(clip, paths, bs, workers, progress=False, draft=False)[0]),
        "ours, bf16": (True, lambda: encode_images(clip, paths, bs, workers, progress=False)[0]),
        "ours, compile": (False, lambda: encode_images(compiled, paths, bs, workers, progress=False)[0]),
        "limit": (False, lambda: forward_only(clip, ready, len(paths), bs)),
        "limit, bf16": (True, lambda: forward_only(clip, ready, len(paths), bs, bf16=True)),
    }
    for bf16 in (False, True):  # warm-up
        forward_only(clip, ready, bs, bs, bf16)
    vectors = {}
    for r in range(spec["repeats"]):
        for s in SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]:
            bf16, job = jobs[s]
            _bf16(bf16)
            t0 = time.perf_counter()
            vectors[s] = job()
            runs[s].append(len(paths) / (time.perf_counter() - t0))
    cos = {s: float(np.sum(vectors[s] * vectors["plain loop"], axis=1).min())  # unit vectors: cosines
           for s in ("ours", "ours, bf16", "ours, compile")}
    return {"images_per_s": runs, "min_cosine": cos, "compile_s": compile_s}


def child_profile(spec: dict) -> dict:
    """Where an image's time goes in ours, one thread, ms per image: decode (JPEG draft), resize + crop
    (the transform's PIL steps), to tensor + normalise, forward (batched, fp32), writing the .npz."""
    import numpy as np
    import torch

    from adapters.clip_finetune.data.decode_cache import InputCache
    from adapters.clip_finetune.data.images import load_image
    from adapters.clip_finetune.retrieval.store import save_embeddings

    torch.set_num_threads(1)
    clip = _load(spec["model"])
    side, _ = _side(clip)
    steps, paths = InputCache(clip.preprocess, 0, side), spec["paths"]
    clip.model.eval()
    times: dict[str, list[float]] = {}

    def timed(name: str, fn, arg):
        t0 = time.perf_counter()
        out = fn(arg)
        times.setdefault(name, []).append((time.perf_counter() - t0) / len(paths) * 1000)
        return out

    for _ in range(2):
        images = timed("decode", lambda ps: [load_image(p, draft=side) for p in ps], paths)
        images = timed("resize + crop", lambda ims: [steps.head(im) for im in ims], images)
        batch = timed("to tensor + normalise", lambda ims: torch.stack([steps.tail(im) for im in ims]), images)
        with torch.inference_mode():
            out = timed("forward", lambda x: clip.model.encode_image(x, normalize=True).numpy(), batch)
        timed("write", lambda v: save_embeddings(Path(spec["out"]), paths, np.asarray(v)), out)
    return {"ms_per_image": {k: min(v) for k, v in times.items()}}


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="clip-tiny,ViT-S-32,ViT-B-32",
                        help="comma-separated open_clip names / config JSONs (random init: speed only)")
    parser.add_argument("--images", type=int, default=128, help="distinct large JPEGs embedded per measurement")
    parser.add_argument("--whole-images", type=int, default=512, help="JPEGs of the whole-process runs (0 skips)")
    parser.add_argument("--whole-models", default="clip-tiny,ViT-B-32", help="models of the whole-process runs")
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
    return parser


def child_decoders(spec: dict) -> dict:
    """ms per image, one thread, of the decoders that could feed a 64-px model from large JPEGs: ours (Pillow's
    draft mode via load_image), libjpeg-turbo's scaled decoding through simplejpeg (the same file read, the same
    scale, made an RGB PIL image as ours is), and a full Pillow decode; and whether simplejpeg's pixels equal ours."""
    import io

    import numpy as np
    from PIL import Image

    from adapters.clip_finetune.data.images import load_image, to_rgb

    try:
        import simplejpeg
    except ImportError:
        return {"ms_per_image": {}, "note": "simplejpeg not installed (pip install simplejpeg)"}
    paths, side = spec["paths"], spec["side"]

    def turbo(path: str) -> Image.Image:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:  # the header: scaled size, EXIF, as load_image reads it
            im.draft(None, (side, side))
            w, h = im.size
            image = Image.fromarray(simplejpeg.decode_jpeg(data, "RGB", min_width=w, min_height=h), "RGB")
            image.info.update(im.info)
        return to_rgb(image)

    decoders = {"ours (Pillow draft)": lambda p: load_image(p, draft=side), "simplejpeg (scaled)": turbo,
                "Pillow, full size": load_image}
    times: dict[str, list[float]] = {k: [] for k in decoders}
    for r in range(4):
        for name, fn in decoders.items() if r % 2 == 0 else reversed(decoders.items()):
            t0 = time.perf_counter()
            for p in paths:
                fn(p)
            times[name].append((time.perf_counter() - t0) / len(paths) * 1000)
    same = all(np.array_equal(np.asarray(load_image(p, draft=side)), np.asarray(turbo(p))) for p in paths)
    return {"ms_per_image": {k: median(v) for k, v in times.items()}, "identical_pixels": same}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        children = {"rss": child_rss, "profile": child_profile, "decoders": child_decoders}
        return serve_child(args.child, lambda system: children.get(system, child_speed))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        w, h = parse_size(args.image_size)
        paths = [p for p, _ in write_jpegs(root / f"embed-{w}x{h}", args.images, args.seed, w, h)]
        mb = sum(Path(p).stat().st_size for p in paths) / len(paths) / 2**20
        base = {"batch": args.batch, "workers": args.workers, "threads": args.threads, "repeats": args.repeats}
        speed, profile = {}, {}
        for model in filter(None, args.models.split(",")):  # --models "": the RSS table only
            speed[model] = run_child("bench.embed", {**base, "system": "speed", "model": model, "paths": paths},
                                     args.threads)
            print(f"{model}: {json.dumps(speed[model])}", file=sys.stderr)
            profile[model] = run_child("bench.embed", {**base, "system": "profile", "model": model,
                                                       "paths": paths[: args.batch], "out": str(root / "p.npz")},
                                       args.threads)
        whole = _whole_process(root, args) if args.whole_images else {}
        decoders = run_child("bench.embed", {**base, "system": "decoders", "paths": paths[:48], "side": 64}, 1)
        rss = []
        if args.rss_items:
            rw, rh = parse_size(args.rss_image_size)
            small = [p for p, _ in write_jpegs(root / f"rss-{rw}x{rh}", 256, args.seed, rw, rh)]
            for n in (int(x) for x in args.rss_items.split(",")):
                rss.append(run_child("bench.embed", {**base, "system": "rss", "model": args.rss_model,
                                                     "paths": small, "items": n}, args.threads))
                print(f"rss {n}: {json.dumps(rss[-1])}", file=sys.stderr)
    print(report(speed, profile, whole, rss, args, argv, mb) + _decoder_table(decoders, args))
    return 0


def _whole_process(root: Path, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Wall seconds of whole processes started from the shell, alternating: the start-up alone, the plain loop
    script, `clip-finetune embed` (the product's defaults: 'auto' precision), on the same folder and model."""
    import os
    import subprocess

    from adapters.clip_finetune.model.clip import save_artifact

    w, h = parse_size(args.image_size)
    folder = root / f"whole-{w}x{h}-{args.whole_images}"
    write_jpegs(folder, args.whole_images, args.seed + 5, w, h)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    out: dict[str, dict[str, list[float]]] = {}
    for model in filter(None, args.whole_models.split(",")):
        model_dir = root / f"model-{model}"
        if not (model_dir / "open_clip_model.safetensors").is_file():
            save_artifact(_load(model), model_dir)
        commands = {
            "start-up": [sys.executable, "-c", "import torch, open_clip"],
            "plain loop": [sys.executable, "-m", "bench.plain_embed", str(model_dir), str(folder),
                           str(root / "plain.npz"), str(args.batch)],
            "ours": [sys.executable, "-m", "adapters.clip_finetune", "embed", "--model", str(model_dir), "--images",
                     str(folder), "--out", str(root / "ours.npz"), "--set", f"batch_size={args.batch}"],
        }
        out[model] = {k: [] for k in commands}
        for r in range(args.repeats):
            for name, cmd in commands.items() if r % 2 == 0 else reversed(commands.items()):
                t0 = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
                out[model][name].append(time.perf_counter() - t0)
        print(f"whole {model}: {json.dumps(out[model])}", file=sys.stderr)
    return out


def report(speed: dict, profile: dict, whole: dict, rss: list[dict], args: argparse.Namespace,
           argv: list[str] | None, mb: float) -> str:
    cmd = shlex.join(["python", "-m", "bench.embed", *(argv if argv is not None else sys.argv[1:])])
    out = [f"`{cmd}`: {args.images} JPEGs of {args.image_size} (mean {mb:.2f} MiB), batch {args.batch}, "
           f"{args.threads} torch threads, random-init weights (speed only), median of {args.repeats} "
           f"alternating runs.\nMachine: {machine()}\n"]
    if speed:
        out.append(_speed_table(speed))
    if profile:
        stages = list(next(iter(profile.values()))["ms_per_image"])
        rows = [[m, *(f"{p['ms_per_image'][s]:.2f}" for s in stages)] for m, p in profile.items()]
        out += ["\nWhere an image's time goes in ours, ms per image on one thread (a batch of "
                f"{args.batch}):\n", markdown_table(["model", *stages], rows)]
    if whole:
        rows = []
        for m, res in whole.items():
            t = {k: median(v) for k, v in res.items()}
            n = args.whole_images
            rows.append([m, n, f"{t['start-up']:.1f}", f"{t['plain loop']:.1f}", f"{t['ours']:.1f}",
                         f"{n / t['plain loop']:.1f}", f"{n / t['ours']:.1f}", f"{t['plain loop'] / t['ours']:.2f}x"])
        out += [f"\nWhole processes from the shell ({args.whole_images} JPEGs of {args.image_size}): "
                "`python -m bench.plain_embed` vs `clip-finetune embed` (default settings), beside "
                "`python -c 'import torch, open_clip'`:\n",
                markdown_table(["model", "images", "start-up s", "plain loop s", "ours s", "plain img/s",
                                "ours img/s", "ours / plain"], rows)]
    if rss:
        out.append(f"\nPeak RSS of `encode_images` ({args.rss_model}, {args.rss_image_size} JPEGs cycled), "
                   "each count in its own process:\n")
        out.append(markdown_table(["items", "peak RSS MiB", "of which the result vectors MiB", "seconds"],
                                  [[r["items"], f"{r['peak_rss_mb']:.0f}", f"{r['result_mb']:.1f}",
                                    f"{r['seconds']:.0f}"] for r in rss]))
    return "\n".join(out)


def _decoder_table(res: dict, args: argparse.Namespace) -> str:
    if not res["ms_per_image"]:
        return f"\n\nDecoders: {res['note']}"
    rows = [[name, f"{ms:.2f}"] for name, ms in res["ms_per_image"].items()]
    return (f"\n\nDecoding a {args.image_size} JPEG for a 64-px model, ms per image, one thread, median of 4 "
            f"alternating passes over 48 files; simplejpeg's pixels equal ours: {res['identical_pixels']}\n\n"
            + markdown_table(["decoder", "ms per image"], rows))


def _speed_table(speed: dict) -> str:
    rows = []
    for model, res in speed.items():
        ips = {s: median(v) for s, v in res["images_per_s"].items()}
        cos = res["min_cosine"]
        rows.append([model, *(f"{ips[s]:.1f}" for s in SYSTEMS), f"{ips['ours'] / ips['plain loop']:.2f}x",
                     f"{ips['ours'] / ips['limit']:.0%}", f"{ips['ours, bf16'] / ips['limit']:.2f}x",
                     f"{cos['ours']:.4f} / {cos['ours, bf16']:.4f}", f"{res['compile_s']:.0f}"])
    return markdown_table(["model", *(f"{s} img/s" for s in SYSTEMS), "ours / plain loop", "ours / limit",
                           "ours bf16 / fp32 limit", "min cosine vs plain: ours / bf16", "compile s"], rows)


if __name__ == "__main__":
    sys.exit(main())
