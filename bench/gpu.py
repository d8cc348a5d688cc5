"""The GPU run, in one call (under 8 minutes on one GPU): ViT-B-32 fine-tuning samples/s and model-FLOPs
utilisation, and embedding images/s, with fused AdamW, bf16, channels_last and torch.compile turned on one at a
time (each row adds one to the row above), against open_clip's own trainer (fp32 and amp_bf16) in the same run.
Prints a markdown table for docs/performance.md (and writes it to --out).

    python -m bench.gpu                        # on a GPU machine
    python -m bench.gpu --device cpu --tiny    # smoke mode: the tiny model, a few steps, in one process

Training: this project's `finetune` on synthetic 320x240 JPEGs (random-init weights: speed only), DataLoader
workers as the project picks them, no validation; samples/s of the epochs after the first (steady state), and
of all epochs. MFU = model FLOPs per sample (torch's FlopCounterMode, forward + backward) x samples/s / the
GPU's peak in the row's dtype: the nominal dense peak where the GPU is known, and a measured large GEMM.
Embedding: encode_images over the same JPEGs (decode included), and the forward pass alone on ready tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from bench.common import (
    TINY_MODEL,
    cores,
    machine,
    markdown_table,
    run_child,
    serve_child,
    write_jpegs,
)

# each row turns one more setting on, in this order
STEPS = ("fp32", "+ fused AdamW", "+ bf16", "+ channels_last", "+ torch.compile")
PEERS = ("open_clip fp32", "open_clip amp_bf16")
# dense tensor-core peaks (TFLOP/s) from the vendors' data sheets: bf16, and fp32 without TF32 (torch's default)
NOMINAL_TFLOPS = {"H200": (989, 67), "H100": (989, 67), "A100": (312, 19.5), "L40S": (362, 91.6), "L4": (121, 30.3),
                  "A10G": (70, 31.2), "A10": (125, 31.2), "RTX 4090": (165, 82.6), "RTX 3090": (71, 35.6)}


def _settings(row: str) -> dict[str, bool]:
    on = STEPS[: STEPS.index(row) + 1]
    return {"fused": "+ fused AdamW" in on, "bf16": "+ bf16" in on, "channels_last": "+ channels_last" in on,
            "compile": "+ torch.compile" in on}


def child_ours(spec: dict) -> dict:
    """Train and embed with the row's settings; epoch seconds, FLOPs per sample, embedding images/s."""
    import torch

    import adapters.clip_finetune.retrieval.embed as embed
    import adapters.clip_finetune.training.loop as loop
    from adapters.clip_finetune.config import FinetuneConfig
    from adapters.clip_finetune.data.load import Splits
    from adapters.clip_finetune.data.pairs import CaptionPair
    from adapters.clip_finetune.model.clip import load_model
    from adapters.clip_finetune.model.precision import autocast_for
    from adapters.clip_finetune.training import finetune

    s = _settings(spec["system"])
    if not s["fused"]:
        adamw = torch.optim.AdamW
        torch.optim.AdamW = lambda *args, **kwargs: adamw(*args, **{**kwargs, "fused": False})
    embed.autocast_for = lambda device, precision: autocast_for(device, "bf16" if s["bf16"] else "fp32")
    if spec.get("eager_compile"):  # the smoke mode: the wiring, without minutes of CPU compilation
        import functools

        import adapters.clip_finetune.model.compiling as compiling

        loop.compile_module = functools.partial(compiling.compile_module, backend="eager")
    seconds = _time_epochs(loop)
    cfg = FinetuneConfig(model_name=spec["model"], pretrained=None, train_batch_size=spec["batch"],
                         num_epochs=spec["epochs"], learning_rate=1e-4, warmup=2, precision="bf16" if s["bf16"]
                         else "fp32", compile=s["compile"], early_stopping=False, checkpoint_every_steps=0,
                         device=spec["device"], batch_size=spec["embed_batch"], base_eval_cache=False)
    clip = load_model(cfg)
    if s["channels_last"]:
        clip.model.to(memory_format=torch.channels_last)
    flops = _flops_per_sample(clip, spec["batch"], s["bf16"])
    pairs = [CaptionPair(p, c) for p, c in spec["train"]]
    finetune(cfg, Splits(pairs), progress=False, clip=clip)
    return {"epoch_s": seconds, "flops": flops, **_embedding(clip, spec, s)}


def _time_epochs(loop) -> list[float]:
    import torch

    seconds: list[float] = []
    train_epoch = loop._train_epoch

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        train_epoch(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)

    loop._train_epoch = timed
    return seconds


def _flops_per_sample(clip, batch: int, bf16: bool) -> float:
    import open_clip
    import torch

    from adapters.clip_finetune.data.decode_cache import transform_size
    from bench.limits import step_flops

    side = transform_size(clip.preprocess)
    images = torch.randn(batch, 3, side, side, device=clip.device)
    tokens = clip.tokenizer(["a photo"] * batch).to(clip.device)

    def step() -> None:
        with torch.autocast(clip.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = open_clip.ClipLoss()(*clip.model(images, tokens)[:3])
        loss.backward()

    flops = step_flops(step)
    clip.model.zero_grad(set_to_none=True)
    return flops / batch


def _embedding(clip, spec: dict, s: dict[str, bool]) -> dict[str, float]:
    """images/s of encode_images over the JPEGs (decode included), and of the forward pass alone."""
    import torch

    from adapters.clip_finetune.data.decode_cache import transform_size
    from adapters.clip_finetune.model.compiling import compile_module
    from adapters.clip_finetune.retrieval.embed import encode_images

    paths, bs = [p for p, _ in spec["train"]][: spec["embed_images"]], spec["embed_batch"]
    if s["compile"]:
        options = {"backend": "eager"} if spec.get("eager_compile") else {}
        compile_module(clip.model.visual, "the image tower", **options)
    sync = torch.cuda.synchronize if clip.device.type == "cuda" else (lambda: None)
    encode_images(clip, paths[:bs], bs, progress=False)  # warm-up (and compilation)
    sync()
    t0 = time.perf_counter()
    encode_images(clip, paths, bs, progress=False)
    sync()
    pipeline = len(paths) / (time.perf_counter() - t0)
    side = transform_size(clip.preprocess)
    ready = torch.randn(bs, 3, side, side, device=clip.device)
    if s["channels_last"]:
        ready = ready.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(clip.device.type, dtype=torch.bfloat16, enabled=s["bf16"]):
        clip.model.encode_image(ready)
        sync()
        t0 = time.perf_counter()
        for _ in range(spec["forward_batches"]):
            clip.model.encode_image(ready)
        sync()
    return {"embed_ips": pipeline, "forward_ips": spec["forward_batches"] * bs / (time.perf_counter() - t0)}


def child_peer(spec: dict) -> dict:
    """open_clip's trainer on the same JPEGs (bench.train's child), timed per epoch the same way."""
    from bench.train import child_open_clip

    system = "open_clip-bf16" if spec["system"] == "open_clip amp_bf16" else "open_clip"
    init = Path(spec["out"]) / "init.pt"
    _init_weights(spec["model"], init)
    peer = {**spec, "system": system, "init": str(init), "lr": 1e-4, "warmup": 2, "wd": 0.1, "seed": 0,
            "workers": spec["workers"], "valid_csv": None, "val": None}
    return child_open_clip(peer)


def _init_weights(model: str, path: Path) -> None:
    from bench.train import make_init

    path.parent.mkdir(parents=True, exist_ok=True)
    make_init(model, path, 0)


def gpu_peaks(device: str) -> dict[str, float]:
    """Nominal (data sheet) and measured (a large GEMM) peak FLOP/s, bf16 and fp32."""
    import torch

    from bench.limits import gemm_peak

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    nominal = next((v for k, v in NOMINAL_TFLOPS.items() if k in name), None)
    n = 8192 if device == "cuda" else 1024
    dev = torch.device(device)
    return {"name": name, "bf16_nominal": nominal[0] * 1e12 if nominal else None,
            "fp32_nominal": nominal[1] * 1e12 if nominal else None,
            "bf16_measured": gemm_peak(dev, torch.bfloat16, n), "fp32_measured": gemm_peak(dev, torch.float32, n)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: clip-tiny, a few steps, one process")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=4096, help="synthetic 320x240 training JPEGs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up (and compilation)")
    parser.add_argument("--workers", type=int, default=8, help="open_clip's DataLoader workers (ours: its default)")
    parser.add_argument("--embed-images", type=int, default=2048)
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--forward-batches", type=int, default=20)
    parser.add_argument("--rows", default=",".join(STEPS + PEERS), help="comma-separated rows to run")
    parser.add_argument("--out", help="also write the markdown here")
    parser.add_argument("--data-dir", help="keep the generated JPEGs here (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return serve_child(args.child, lambda system: child_peer if system in PEERS else child_ours)
    if args.tiny:  # a few seconds of everything on a CPU
        args.model, args.images, args.batch, args.epochs = str(TINY_MODEL), 16, 8, 2
        args.embed_images, args.embed_batch, args.forward_batches, args.workers = 16, 8, 2, 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        train = write_jpegs(root / "gpu-320x240", args.images, 0, 320, 240)
        csv = root / "train.csv"
        csv.write_text("filepath,title\n" + "".join(f"{p},{c.replace(',', ' ')}\n" for p, c in train))
        spec = {"model": args.model, "train": train, "csv": str(csv), "batch": args.batch, "epochs": args.epochs,
                "workers": args.workers, "device": args.device, "embed_images": args.embed_images,
                "embed_batch": args.embed_batch, "forward_batches": args.forward_batches, "eager_compile": args.tiny}
        results = {}
        for row in rows:
            job = {**spec, "system": row, "out": str(root / f"run-{STEPS.index(row) if row in STEPS else row}")}
            if args.tiny:  # one process: the smoke test checks the wiring, not the numbers
                results[row] = (child_peer if row in PEERS else child_ours)(job)
            else:
                results[row] = run_child("bench.gpu", job, cores())
            print(f"{row}: {json.dumps(results[row])}", file=sys.stderr)
        peaks = gpu_peaks(args.device)
    table = report(results, peaks, args, argv, time.perf_counter() - t_start)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def report(results: dict, peaks: dict, args: argparse.Namespace, argv: list[str] | None, seconds: float) -> str:
    per_epoch = (args.images // args.batch) * args.batch
    flops = next((r["flops"] for r in results.values() if "flops" in r), None)
    rows = []
    for name, r in results.items():
        steady = per_epoch / median(r["epoch_s"][1:] or r["epoch_s"])
        dtype = "bf16" if name == "open_clip amp_bf16" or name in STEPS[STEPS.index("+ bf16"):] else "fp32"
        mfu = [f"{flops * steady / p:.0%}" if flops and p else "n/a"
               for p in (peaks[f"{dtype}_nominal"], peaks[f"{dtype}_measured"])]
        rows.append([name, f"{steady:.0f}", f"{len(r['epoch_s']) * per_epoch / sum(r['epoch_s']):.0f}", *mfu,
                     f"{r['embed_ips']:.0f}" if "embed_ips" in r else "", f"{r['forward_ips']:.0f}"
                     if "forward_ips" in r else ""])
    cmd = "python -m bench.gpu" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    nominal = f"{peaks['bf16_nominal'] / 1e12:.0f}" if peaks["bf16_nominal"] else "unknown"
    head = (f"`{cmd}` ({seconds:.0f} s): {Path(args.model).stem}, random init, {args.images} JPEGs of 320x240, "
            f"batch {args.batch}, {args.epochs} epochs (steady state: epochs 2+). Model FLOPs per training sample: "
            f"{flops / 1e9 if flops else float('nan'):.1f} GFLOP. Peaks: bf16 nominal {nominal} TFLOP/s, measured "
            f"{peaks['bf16_measured'] / 1e12:.0f}; fp32 measured {peaks['fp32_measured'] / 1e12:.1f} TFLOP/s.\n"
            f"Machine: {machine()}\n")
    headers = ["trainer / settings", "train samples/s (steady)", "samples/s (all epochs)", "MFU (nominal peak)",
               "MFU (measured GEMM peak)", "embed images/s (JPEG to vector)", "embed forward-only images/s"]
    return head + "\n" + markdown_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())
