"""Training throughput, memory and quality: this project's `fit` vs open_clip's own trainer (open_clip_train).

Both train the same architecture from the same initial weights on the same synthetic photo-sized JPEGs
with the same hyperparameters (batch, lr, warmup, epochs, weight decay, betas, eps, grad clipping, fp32,
DataLoader workers, torch threads), each in its own process, alternating. Both final models are scored
by this project's evaluate() on the same held-out JPEGs. Prints a markdown table (docs/performance.md).

    python -m bench.train                       # tiny CLIP, about 5 minutes on 2 CPU cores
    python -m bench.train --model ViT-B-32      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from bench.common import TINY_MODEL, cores, emit, load_spec, machine, markdown_table, parse_size, run_child, write_jpegs

# ours-no*: this project with one optimisation turned off, to measure what each one gives (ours-nothreads: since
# training no longer decodes on threads, it only changes the held-out evaluation, outside train_s); ours-nodraft: no
# cache and full-size decoding every epoch (the image path open_clip's trainer takes); ours-plain: every
# optimisation off (nodraft + nothreads + nofused), the loop itself against open_clip's
SYSTEMS = ("ours", "open_clip", "ours-nocache", "ours-nodraft", "ours-nothreads", "ours-nofused", "ours-plain")


def _model_arg(name: str) -> str:
    return str(TINY_MODEL) if name == "clip-tiny" else name


def _config(spec: dict, pretrained: str | None, cache_mb: int):
    from adapters.clip_finetune.config import FinetuneConfig

    return FinetuneConfig(
        model_name=spec["model"], pretrained=pretrained, train_batch_size=spec["batch"], num_epochs=spec["epochs"],
        learning_rate=spec["lr"], warmup=spec["warmup"], weight_decay=spec["wd"], grad_clip_norm=1.0,
        precision="fp32", num_workers=spec["workers"], early_stopping=False, checkpoint_every_steps=0,
        seed=spec["seed"], device=spec["device"], batch_size=64, image_cache_mb=cache_mb,
    )


def _held_out_score(spec: dict, state_dict: dict | None = None, artifact: str | None = None) -> dict[str, float]:
    """Text->image R@1 / R@5 of a trained model on the held-out pairs, by this project's evaluate()."""
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


def child_ours(spec: dict) -> dict:
    from adapters.clip_finetune.data.load import Splits
    from adapters.clip_finetune.data.pairs import CaptionPair
    from adapters.clip_finetune.training import finetune

    system = spec["system"]
    if system in ("ours-nothreads", "ours-plain"):
        import adapters.clip_finetune.machine as machine

        machine.decode_threads = lambda: 1
    if system in ("ours-nodraft", "ours-plain"):
        import adapters.clip_finetune.training.loop as train_module

        train_module.train_cache = lambda *args, **kwargs: None  # PairDataset then decodes each image in full
    if system in ("ours-nofused", "ours-plain"):
        import torch

        adamw = torch.optim.AdamW
        # finetune() passes fused=True itself: override the keyword (functools.partial's default would lose to it)
        torch.optim.AdamW = lambda *args, **kwargs: adamw(*args, **{**kwargs, "fused": False})
    cache_mb = 0 if system == "ours-nocache" else spec["cache_mb"]
    cfg = _config(spec, spec["init"], cache_mb)
    out = Path(spec["out"])
    result = finetune(cfg, Splits([CaptionPair(p, c) for p, c in spec["train"]]), out, progress=False)
    train_s = sum(r["seconds"] for r in result.history)
    rss = _rss()
    return {"train_s": train_s, "peak_rss_mb": rss, **_held_out_score(spec, artifact=str(out))}


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

    def timed(*args, **kwargs):  # the epoch's steps, data loading included, as fit's epoch seconds
        t0 = time.perf_counter()
        out = train_one_epoch(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out

    oc_main.train_one_epoch = timed
    logs = Path(spec["out"])
    argv = ["--train-data", spec["csv"], "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", name,
            "--pretrained", spec["init"], "--batch-size", str(spec["batch"]), "--lr", str(spec["lr"]),
            "--warmup", str(spec["warmup"]), "--epochs", str(spec["epochs"]), "--wd", str(spec["wd"]),
            "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0",
            "--workers", str(spec["workers"]), "--precision", "fp32", "--device", spec["device"],
            "--seed", str(spec["seed"]), "--logs", str(logs), "--name", "run", "--save-frequency", "1",
            "--log-every-n-steps", "1000", "--zeroshot-frequency", "0", "--report-to", ""]
    oc_main.main(argv)
    rss = _rss()
    ckpt = logs / "run" / "checkpoints" / f"epoch_{spec['epochs']}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {"train_s": sum(seconds), "peak_rss_mb": rss, **_held_out_score(spec, state_dict=state)}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="clip-tiny", help="open_clip name or config JSON; clip-tiny: the "
                        "project's 64-px test architecture (default, for CPUs); ViT-B-32 on a GPU")
    parser.add_argument("--train", type=int, default=1024, help="training pairs (synthetic JPEGs)")
    parser.add_argument("--val", type=int, default=500, help="held-out pairs")
    parser.add_argument("--image-size", default="640x480", help="JPEG width x height")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr (random init: high)")
    parser.add_argument("--warmup", type=int, default=20, help="warmup steps")
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, both systems")
    parser.add_argument("--threads", type=int, default=cores(), help="torch threads, both systems")
    parser.add_argument("--cache-mb", type=int, default=2048, help="this project's image_cache_mb")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per system")
    parser.add_argument("--systems", default="ours,open_clip", help=f"comma-separated, of {','.join(SYSTEMS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="keep the generated JPEGs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.child:
        spec = load_spec(args.child)
        emit((child_open_clip if spec["system"] == "open_clip" else child_ours)(spec))
        return 0

    systems = [s.strip() for s in args.systems.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        w, h = parse_size(args.image_size)
        t0 = time.perf_counter()
        train = write_jpegs(root / f"train-{w}x{h}", args.train, args.seed, w, h)
        val = write_jpegs(root / f"val-{w}x{h}", args.val, args.seed + 1, w, h)
        csv = root / "train.csv"
        csv.write_text("filepath,title\n" + "".join(f"{p},{c.replace(',', ' ')}\n" for p, c in train))
        print(f"data: {args.train} + {args.val} JPEGs {w}x{h} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        init = root / "init.pt"
        make_init(_model_arg(args.model), init, args.seed)
        spec = {"model": _model_arg(args.model), "init": str(init), "train": train, "val": val, "csv": str(csv),
                "batch": args.batch, "epochs": args.epochs, "lr": args.lr, "warmup": args.warmup, "wd": args.wd,
                "workers": args.workers, "cache_mb": args.cache_mb, "device": args.device, "seed": args.seed}
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for r in range(args.repeats):
            for s in systems if r % 2 == 0 else systems[::-1]:  # alternate the order: A B, B A, ...
                out = root / f"run-{s}-{r}"
                res = run_child("bench.train", {**spec, "system": s, "out": str(out)}, args.threads)
                print(f"{s} run {r + 1}: {json.dumps(res)}", file=sys.stderr)
                runs[s].append(res)
    samples = args.epochs * (args.train // args.batch) * args.batch
    print(report(runs, samples, args, argv))
    return 0


def report(runs: dict[str, list[dict]], samples: int, args: argparse.Namespace, argv: list[str] | None) -> str:
    rows, summary = [], {}
    for s, rs in runs.items():
        sps = median(samples / r["train_s"] for r in rs)
        summary[s] = {"sps": sps, "wall": median(r["wall_s"] for r in rs), "rss": max(r["peak_rss_mb"] for r in rs),
                      "r1": median(r["R@1"] for r in rs), "r5": median(r["R@5"] for r in rs)}
        m = summary[s]
        rows.append([s, f"{sps:.1f}", f"{m['wall']:.1f}", f"{m['rss']:.0f}", f"{m['r1']:.3f}", f"{m['r5']:.3f}",
                     " / ".join(f"{samples / r['train_s']:.1f}" for r in rs)])
    if "ours" in summary and "open_clip" in summary:
        a, b = summary["ours"], summary["open_clip"]
        rows.append(["ours / open_clip", f"{a['sps'] / b['sps']:.2f}x", f"{a['wall'] / b['wall']:.2f}x",
                     f"{a['rss'] / b['rss']:.2f}x", f"{a['r1'] - b['r1']:+.3f}", f"{a['r5'] - b['r5']:+.3f}", ""])
    cmd = "python -m bench.train" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    head = (f"`{cmd}`: {args.model}, {args.train} training pairs ({args.image_size} JPEGs), {args.val} held-out, "
            f"batch {args.batch}, {args.epochs} epochs, lr {args.lr:g}, warmup {args.warmup}, wd {args.wd:g}, fp32, "
            f"{args.workers} workers, {args.threads} torch threads, median of {args.repeats} alternating runs.\n"
            f"Machine: {machine()}\n")
    headers = ["system", "train samples/s", "wall s (process)", "peak RSS MiB", "t->i R@1", "t->i R@5",
               "samples/s per run"]
    return head + "\n" + markdown_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())
