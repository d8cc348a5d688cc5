"""Training throughput, memory and quality: this project's `finetune` vs open_clip's own trainer (open_clip_train).

Both train the same architecture from the same initial weights on the same synthetic photo-sized JPEGs with the
same hyperparameters (batch, lr, warmup, epochs, weight decay, betas, eps, grad clipping, precision, DataLoader
workers, torch threads) and the same validation set evaluated after every epoch, each in its own process started
from the shell, alternating. Both final models are scored by this project's evaluate() on held-out JPEGs.
Prints a markdown table (docs/performance.md): samples/s of the epochs alone, of the epochs after the first
(steady state), and of the whole process (start-up, data reading, evaluation included), beside the matrix-product
limit of the model's training step on this machine (bench/limits.py).

    python -m bench.train                       # decode-bound: 640x480 JPEGs, batch 32 (2 CPU cores: ~10 min)
    python -m bench.train --preset compute      # compute-bound: 2,000 pairs of 320x240 JPEGs, batch 128
    python -m bench.train --preset product      # compute-bound, product photos in a Dataloop download, our CLI
    python -m bench.train --model ViT-B-32 --device cuda
"""

from __future__ import annotations

import argparse
import csv
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
    parse_size,
    run_child,
    serve_child,
    write_jpegs,
)

# ours-no*: this project with one optimisation turned off (ours-nothreads: only the evaluation's decode threads;
# ours-nodraft: no cache and full-size decoding every epoch, the image path of open_clip's trainer; ours-plain:
# nodraft + nothreads + nofused + noevalcache); -bf16 / -compile: one setting turned on; limit: the step's matrix
# products alone (not a trainer)
SYSTEMS = ("ours", "open_clip", "ours-bf16", "open_clip-bf16", "ours-compile", "ours-noevalcache", "ours-nocache",
           "ours-nodraft", "ours-nothreads", "ours-nofused", "ours-plain", "limit", "ours-cli")
_RECIPE = {"lr": 1e-3, "warmup": 20, "grad_clip": 1.0, "systems": "ours,open_clip,limit"}
PRESETS = {
    "decode": {"train": 1024, "valid": 250, "val": 500, "image_size": "640x480", "batch": 32, "epochs": 5, **_RECIPE},
    "compute": {"train": 2000, "valid": 250, "val": 500, "image_size": "320x240", "batch": 128, "epochs": 10,
                **_RECIPE},
    # issue 26's set: product photos with English and German titles (a quarter duplicates) in a Dataloop download,
    # no gradient clipping, ours as `clip-finetune train` (bench/train_cli.py, bench/product.py)
    "product": {"train": 2000, "valid": 400, "val": 400, "image_size": "320x240", "batch": 128, "epochs": 10,
                "lr": 2e-3, "warmup": 50, "grad_clip": 0.0, "systems": "ours-cli,open_clip"},
}


def _model_arg(name: str) -> str:
    return str(TINY_MODEL) if name == "clip-tiny" else name


def _config(spec: dict, pretrained: str | None, cache_mb: int, **extra):
    from adapters.clip_finetune.config import FinetuneConfig

    return FinetuneConfig(**{
        "model_name": spec["model"], "pretrained": pretrained, "train_batch_size": spec["batch"],
        "num_epochs": spec["epochs"], "learning_rate": spec["lr"], "warmup": spec["warmup"], "weight_decay": spec["wd"],
        "grad_clip_norm": spec.get("clip", 1.0), "precision": "fp32", "num_workers": spec["workers"],
        "early_stopping": False,
        "checkpoint_every_steps": 0, "seed": spec["seed"], "device": spec["device"], "batch_size": 64,
        "image_cache_mb": cache_mb, "base_eval_cache": False, **extra})


def _held_out_score(spec: dict, state_dict: dict | None = None, artifact: str | None = None) -> dict[str, float]:
    """Text->image R@1 / R@5 of a trained model on the held-out pairs, by this project's evaluate() (fp32)."""
    from adapters.clip_finetune.data.pairs import CaptionPair
    from adapters.clip_finetune.model.clip import load_artifact, load_model
    from adapters.clip_finetune.retrieval.evaluate import evaluate

    if artifact is not None:
        clip = load_artifact(artifact, spec["device"])
    else:
        clip = load_model(_config(spec, spec["init"], 0))
        clip.model.load_state_dict(state_dict)
    pairs = [CaptionPair(p, c) for p, c in spec["val"]]
    m = evaluate(clip, pairs, batch_size=64, num_workers=spec["workers"])
    return {"R@1": m["text_to_image/recall@1"], "R@5": m["text_to_image/recall@5"]}


def _switch_off(system: str) -> None:
    """Turn off the optimisation an ours-no* system names (patched in this child process only)."""
    import adapters.clip_finetune.training.loop as loop

    if system in ("ours-nothreads", "ours-plain"):
        import adapters.clip_finetune.machine as machine

        machine.decode_threads = lambda: 1
    if system in ("ours-nodraft", "ours-plain"):
        loop.train_cache = lambda *args, **kwargs: None  # PairDataset then decodes each image in full
    if system in ("ours-noevalcache", "ours-plain"):
        loop.eval_cache_for = lambda cfg, clip, n: (None, float(cfg.image_cache_mb))
    if system in ("ours-nofused", "ours-plain"):
        import torch

        adamw = torch.optim.AdamW
        # finetune() passes fused=True itself: override the keyword (functools.partial's default would lose to it)
        torch.optim.AdamW = lambda *args, **kwargs: adamw(*args, **{**kwargs, "fused": False})


def child_ours(spec: dict) -> dict:
    import adapters.clip_finetune.training.loop as loop
    from adapters.clip_finetune.data.load import Splits
    from adapters.clip_finetune.data.pairs import CaptionPair
    from adapters.clip_finetune.training import finetune

    system = spec["system"]
    _switch_off(system)
    seconds: list[float] = []
    train_epoch = loop._train_epoch

    def timed(*args, **kwargs):  # the epoch's steps, data loading included; not the evaluation after it
        t0 = time.perf_counter()
        train_epoch(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)

    loop._train_epoch = timed
    extra = {"precision": "bf16"} if system == "ours-bf16" else {"compile": True} if system == "ours-compile" else {}
    cfg = _config(spec, spec["init"], 0 if system == "ours-nocache" else spec["cache_mb"], **extra)
    out = Path(spec["out"])
    pairs = [CaptionPair(p, c) for p, c in spec["train"]]
    finetune(cfg, Splits(pairs, [CaptionPair(p, c) for p, c in spec["valid"]]), out, progress=False)
    return {"epoch_s": seconds, "peak_rss_mb": _rss(), **_held_out_score(spec, artifact=str(out))}


def child_open_clip(spec: dict) -> dict:
    import open_clip
    import open_clip_train.main as oc_main
    import torch

    name = spec["model"]
    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    seconds: list[float] = []
    train_one_epoch = oc_main.train_one_epoch

    def timed(*args, **kwargs):  # the epoch's steps, data loading included, as ours
        t0 = time.perf_counter()
        out = train_one_epoch(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out

    oc_main.train_one_epoch = timed
    logs, run_name = Path(spec["out"]), f"run-{time.time_ns()}"  # open_clip refuses a name it has logged before
    precision = "amp_bf16" if spec["system"] == "open_clip-bf16" else "fp32"
    argv = ["--train-data", spec["csv"], *(["--val-data", spec["valid_csv"]] if spec.get("valid_csv") else []),
            "--dataset-type", "csv",
            "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", name,
            "--pretrained", spec["init"], "--batch-size", str(spec["batch"]), "--lr", str(spec["lr"]),
            "--warmup", str(spec["warmup"]), "--epochs", str(spec["epochs"]), "--wd", str(spec["wd"]),
            "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
            *(["--grad-clip-norm", str(spec.get("clip", 1.0))] if spec.get("clip", 1.0) else []),
            "--workers", str(spec["workers"]), "--precision", precision, "--device", spec["device"],
            "--seed", str(spec["seed"]), "--logs", str(logs), "--name", run_name, "--save-frequency", "1",
            "--log-every-n-steps", "1000", "--zeroshot-frequency", "0", "--report-to", ""]
    oc_main.main(argv)
    rss = _rss()
    ckpt = logs / run_name / "checkpoints" / f"epoch_{spec['epochs']}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not spec.get("val"):
        return {"epoch_s": seconds, "peak_rss_mb": rss}
    return {"epoch_s": seconds, "peak_rss_mb": rss, **_held_out_score(spec, state_dict=state)}


def child_limit(spec: dict) -> dict:
    """The model's training step at the benchmark's batch: its matrix products alone (fp32, bf16) and FLOPs."""
    import open_clip
    import torch

    from adapters.clip_finetune.data.decode_cache import transform_size
    from adapters.clip_finetune.model import text_trim
    from adapters.clip_finetune.model.clip import load_model
    from bench.limits import matmul_limit, step_flops

    clip = load_model(_config(spec, None, 0))
    side, n = transform_size(clip.preprocess), spec["batch"]
    images = torch.randn(n, 3, side, side, device=clip.device)
    tokens = clip.tokenizer(["a photo of a red circle on the left"] * n).to(clip.device)
    loss_fn = open_clip.ClipLoss()
    # this project's step on the first batch of the set's own captions: the text cut to their end-of-text tokens
    own_tokens = text_trim.trim_tokens(clip.model, clip.tokenizer([c for _, c in spec["train"][:n]]))

    def step(bf16: bool = False, own: bool = False) -> None:
        with torch.autocast(clip.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = text_trim.forward(clip.model, images, own_tokens) if own else clip.model(images, tokens)
            loss = loss_fn(*out[:3])
        loss.backward()

    optimizer = torch.optim.AdamW(clip.model.parameters(), lr=1e-5, fused=True)

    def whole_step(bf16: bool) -> float:  # the whole step (with the optimizer), as the trainer runs it
        t0 = time.perf_counter()
        step(bf16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    steps: dict[bool, list[float]] = {False: [], True: []}
    for r in range(1 + spec.get("limit_steps", 4)):  # alternating; the first pair warms up
        for bf16 in (False, True) if r % 2 == 0 else (True, False):
            seconds = whole_step(bf16)
            if r:
                steps[bf16].append(seconds)
    return {"fp32_s": matmul_limit(step), "bf16_s": matmul_limit(lambda: step(True)), "flops": step_flops(step),
            "step_fp32_s": median(steps[False]), "step_bf16_s": median(steps[True]),
            "own_fp32_s": matmul_limit(lambda: step(own=True)), "own_tokens": own_tokens.shape[1],
            "context": tokens.shape[1]}


def _rss() -> float:
    from bench.common import peak_rss_mb

    return peak_rss_mb()


def make_init(model: str, path: Path, seed: int) -> None:
    """The initial weights both systems start from (a plain state_dict file, which both load)."""
    import torch

    from adapters.clip_finetune.config import FinetuneConfig
    from adapters.clip_finetune.model.clip import load_model

    torch.manual_seed(seed)
    clip = load_model(FinetuneConfig(model_name=model, pretrained=None, device="cpu"))
    torch.save(clip.model.state_dict(), path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=PRESETS, default="decode", help="decode: 1024 pairs of 640x480 JPEGs, "
                        "batch 32, 5 epochs; compute: 2000 pairs of 320x240, batch 128, 10 epochs")
    parser.add_argument("--model", default="clip-tiny", help="open_clip name or config JSON; clip-tiny: the "
                        "project's 64-px test architecture (default, for CPUs); ViT-B-32 on a GPU")
    parser.add_argument("--train", type=int, help="training pairs (synthetic JPEGs; default: the preset's)")
    parser.add_argument("--valid", type=int, help="validation pairs, evaluated after every epoch by both")
    parser.add_argument("--val", type=int, help="held-out pairs, scored once at the end")
    parser.add_argument("--image-size", help="JPEG width x height")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, help="peak lr (random init: high; default 1e-3, product 2e-3)")
    parser.add_argument("--warmup", type=int, help="warmup steps (default 20, product 50)")
    parser.add_argument("--grad-clip", type=float, help="gradient clipping norm, 0: none (default 1, product 0)")
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, both systems")
    parser.add_argument("--threads", type=int, default=cores(), help="torch threads, both systems")
    parser.add_argument("--cache-mb", type=int, default=2048, help="this project's image_cache_mb")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per system (ours-cli: pairs)")
    parser.add_argument("--systems", help=f"comma-separated, of {','.join(SYSTEMS)} (default: ours,open_clip,limit; "
                        "product: ours-cli,open_clip, which runs as bench/train_cli.py describes)")
    parser.add_argument("--eval-cache", choices=("cold", "warm"), default="cold", help="ours-cli: an empty "
                        "base-evaluation store for each run (cold), or one filled by an untimed run first (warm)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="keep the generated JPEGs here (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return serve_child(args.child, lambda system: child_limit if system == "limit" else child_open_clip
                           if system.startswith("open_clip") else child_ours)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    systems = [s.strip() for s in args.systems.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        spec = _data(Path(args.data_dir or tmp), args)
        if "ours-cli" in systems:  # whole `clip-finetune train` processes against open_clip's trainer, in pairs
            from bench.train_cli import compare
            from bench.train_cli import report as pair_report

            print(pair_report(compare(spec, args), args, _head(args, argv)))
            return 0
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for r in range(args.repeats):
            for s in systems if r % 2 == 0 else systems[::-1]:  # alternate the order: A B, B A, ...
                if s == "limit" and r > 0:
                    continue  # measured once: it does not depend on the order
                out = Path(spec["root"]) / f"run-{s}-{r}"
                res = run_child("bench.train", {**spec, "system": s, "out": str(out)}, args.threads)
                print(f"{s} run {r + 1}: {json.dumps(res)}", file=sys.stderr)
                runs[s].append(res)
    print(report(runs, args, argv))
    return 0


def _data(root: Path, args: argparse.Namespace) -> dict:
    w, h = parse_size(args.image_size)
    t0 = time.perf_counter()
    download = None
    if args.preset == "product":  # a Dataloop download (train/ + validation/ subsets) and a held-out subset
        from bench.product import write_product_download

        download = root / f"product-{w}x{h}"
        parts = write_product_download(download, {"train": args.train, "validation": args.valid}, args.seed, w, h)
        train, valid = parts["train"], parts["validation"]
        val = write_product_download(root / f"product-{w}x{h}-heldout", {"test": args.val}, args.seed + 1, w, h)["test"]
    else:
        train = write_jpegs(root / f"train-{w}x{h}", args.train, args.seed, w, h)
        valid = write_jpegs(root / f"valid-{w}x{h}", args.valid, args.seed + 2, w, h)
        val = write_jpegs(root / f"val-{w}x{h}", args.val, args.seed + 1, w, h)
    for name, pairs in (("train.csv", train), ("valid.csv", valid)):  # open_clip's (pandas) CSV, quoted as needed
        with (root / name).open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("filepath", "title"), *pairs])
    print(f"data: {args.train} + {args.valid} + {args.val} JPEGs {w}x{h} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    init = root / "init.pt"
    make_init(_model_arg(args.model), init, args.seed)
    return {"root": str(root), "model": _model_arg(args.model), "init": str(init), "train": train, "valid": valid,
            "val": val, "csv": str(root / "train.csv"), "valid_csv": str(root / "valid.csv"), "batch": args.batch,
            "epochs": args.epochs, "lr": args.lr, "warmup": args.warmup, "wd": args.wd, "workers": args.workers,
            "cache_mb": args.cache_mb, "device": args.device, "seed": args.seed, "clip": args.grad_clip or None,
            "data_arg": str(download) if download else str(root / "train.csv"),
            "validation_arg": None if download else str(root / "valid.csv")}


def report(runs: dict[str, list[dict]], args: argparse.Namespace, argv: list[str] | None) -> str:
    per_epoch = (args.train // args.batch) * args.batch
    samples = args.epochs * per_epoch
    limit = runs.pop("limit", [None])[0]
    rows, summary = [], {}
    for s, rs in runs.items():
        steady = median(per_epoch / median(r["epoch_s"][1:] or r["epoch_s"]) for r in rs)
        m = summary[s] = {"sps": median(samples / sum(r["epoch_s"]) for r in rs), "steady": steady,
                          "whole": median(samples / r["wall_s"] for r in rs), "wall": median(r["wall_s"] for r in rs),
                          "rss": max(r["peak_rss_mb"] for r in rs), "r1": median(r["R@1"] for r in rs),
                          "r5": median(r["R@5"] for r in rs)}
        of_limit = f"{steady * limit['fp32_s'] / args.batch:.0%}" if limit else ""
        if limit and "own_fp32_s" in limit and s.startswith("ours"):  # also against the products it really runs
            of_limit += f" ({steady * limit['own_fp32_s'] / args.batch:.0%} of its own)"
        rows.append([s, f"{m['sps']:.1f}", f"{steady:.1f}", of_limit, f"{m['whole']:.1f}", f"{m['wall']:.1f}",
                     f"{m['rss']:.0f}", f"{m['r1']:.3f}", f"{m['r5']:.3f}",
                     " / ".join(f"{samples / r['wall_s']:.1f}" for r in rs)])
    for a, b in (("ours", "open_clip"), ("ours-bf16", "open_clip-bf16"), ("ours-bf16", "ours")):
        if a in summary and b in summary:
            x, y = summary[a], summary[b]
            rows.append([f"{a} / {b}", f"{x['sps'] / y['sps']:.2f}x", f"{x['steady'] / y['steady']:.2f}x", "",
                         f"{x['whole'] / y['whole']:.2f}x", f"{x['wall'] / y['wall']:.2f}x",
                         f"{x['rss'] / y['rss']:.2f}x",
                         f"{x['r1'] - y['r1']:+.3f}", f"{x['r5'] - y['r5']:+.3f}", ""])
    head = _head(args, argv)
    if limit:
        head += (f"\nMatrix-product limit of the training step at batch {args.batch} (bench/limits.py): fp32 "
                 f"{args.batch / limit['fp32_s']:.1f} samples/s, bf16 {args.batch / limit['bf16_s']:.1f} samples/s; "
                 f"{limit['flops'] / args.batch / 1e9:.3f} GFLOP per sample (forward + backward). The whole step "
                 f"(forward, backward, fused AdamW) in the same process, alternating: fp32 "
                 f"{args.batch / limit['step_fp32_s']:.1f} samples/s, bf16 autocast "
                 f"{args.batch / limit['step_bf16_s']:.1f} samples/s. This project's step cuts the text after the "
                 f"batch's last end-of-text token (model/text_trim.py): on the set's first batch of captions "
                 f"{limit['own_tokens']} of {limit['context']} positions, a matrix-product limit of "
                 f"{args.batch / limit['own_fp32_s']:.1f} samples/s fp32 (\"of its own\" below); the full-context "
                 f"limit is what open_clip's step runs.\n")
    headers = ["system", "train samples/s (epochs)", "steady samples/s (epochs 2+)", "steady / fp32 limit",
               "whole-process samples/s", "wall s", "peak RSS MiB", "t->i R@1", "t->i R@5", "whole-process per run"]
    return head + "\n" + markdown_table(headers, rows)


def _head(args: argparse.Namespace, argv: list[str] | None) -> str:
    cmd = "python -m bench.train" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    clip = f"gradient clipping {args.grad_clip:g}" if args.grad_clip else "no gradient clipping"
    return (f"`{cmd}`: {args.model}, {args.train} training pairs ({args.image_size} JPEGs), {args.valid} validation "
            f"pairs evaluated after every epoch by both, {args.val} held-out, batch {args.batch}, "
            f"{args.epochs} epochs, lr {args.lr:g}, warmup {args.warmup}, wd {args.wd:g}, {clip}, fp32 unless named, "
            f"{args.workers} workers, {args.threads} torch threads, {args.repeats} alternating runs.\n"
            f"Machine: {machine()}\n")


if __name__ == "__main__":
    sys.exit(main())
