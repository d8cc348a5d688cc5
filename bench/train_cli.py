"""`python -m bench.train` with `ours-cli`: this project trained as a new user runs it, `clip-finetune train` in a
child process (the whole process timed from the shell: start-up, reading the data, every evaluation, checkpoints,
writing the model), against open_clip's trainer at its defaults (it evaluates the validation CSV after every
epoch), in alternating pairs: ours first in the first pair, open_clip first in the second, and so on.

Each run's wall seconds and CPU seconds (user + system of the child, from getrusage: what load from other
processes changes least) are reported with the 1-minute load average when it started; the ratio of each pair
(open_clip's seconds / ours: > 1 is ours faster) with the min / median / max over the pairs. Both trained models
are then scored on the held-out pairs by this project's evaluate(), outside the timed processes.

`--eval-cache cold` gives each of our runs an empty base-evaluation store ($CLIP_FINETUNE_CACHE: a new user's
first run); `warm` fills one store with an untimed one-step run first and lets every timed run read it (a rerun
on the same data from the same base model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from bench.common import ROOT, markdown_table, run_child


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _child_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cli_command(spec: dict, out: Path, steps: int | None = None) -> list[str]:
    """`clip-finetune train` with the benchmark's recipe, every other setting at its default; `steps`: stop
    after that many optimisation steps (the warm-up run that fills the base-evaluation store)."""
    exe = Path(sys.executable).with_name("clip-finetune")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "adapters.clip_finetune"]
    sets = {"model_name": spec["model"], "pretrained": spec["init"], "train_batch_size": spec["batch"],
            "num_epochs": spec["epochs"], "learning_rate": spec["lr"], "warmup": spec["warmup"],
            "weight_decay": spec["wd"], "grad_clip_norm": spec["clip"], "early_stopping": False,
            "seed": spec["seed"], "device": spec["device"], "num_workers": spec["workers"],
            **({"max_steps": steps} if steps else {})}
    cmd += ["train", "--data", spec["data_arg"], "--out", str(out), "--overwrite"]
    if spec.get("validation_arg"):
        cmd += ["--validation", spec["validation_arg"]]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return cmd


def run_cli(spec: dict, out: Path, threads: int, cache_dir: Path, steps: int | None = None) -> dict:
    """One `clip-finetune train` process: wall and CPU seconds, the load when it started, its epoch history."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CLIP_FINETUNE_CACHE": str(cache_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    load, cpu0, t0 = load_average(), _child_cpu_s(), time.perf_counter()
    proc = subprocess.run(cli_command(spec, out, steps), cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    wall, cpu = time.perf_counter() - t0, _child_cpu_s() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"clip-finetune train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    history = json.loads((out / "metrics.json").read_text()).get("history", [])
    return {"wall_s": wall, "cpu_s": cpu, "load": load, "epoch_s": [h["seconds"] for h in history]}


def run_open_clip(spec: dict, out: Path, threads: int) -> dict:
    """open_clip's trainer in a child process (bench.train's child_open_clip), its checkpoint kept for scoring."""
    load, cpu0 = load_average(), _child_cpu_s()
    res = run_child("bench.train", {**spec, "system": "open_clip", "out": str(out), "val": []}, threads)
    return {**res, "cpu_s": _child_cpu_s() - cpu0, "load": load}


def held_out(spec: dict, system: str, out: Path) -> dict[str, float]:
    """R@1 / R@5 of a trained model on the held-out pairs (this process, untimed)."""
    import torch

    from bench.train import _held_out_score

    if system == "ours-cli":
        return _held_out_score(spec, artifact=str(out))
    ckpt = next(out.glob(f"*/checkpoints/epoch_{spec['epochs']}.pt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return _held_out_score(spec, state_dict={k.removeprefix("module."): v for k, v in state.items()})


def compare(spec: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    """`args.repeats` alternating pairs of ours-cli and open_clip; each run's times, load and held-out scores."""
    root = Path(spec["root"])
    store = root / "eval-store-warm"
    if args.eval_cache == "warm":  # one untimed step fills the store with the base model's validation embeddings
        run_cli(spec, root / "run-prime", args.threads, store, steps=1)
    runs: dict[str, list[dict]] = {"ours-cli": [], "open_clip": []}
    for r in range(args.repeats):
        for system in ("ours-cli", "open_clip") if r % 2 == 0 else ("open_clip", "ours-cli"):
            out = root / f"run-{system}-{r}"
            if system == "ours-cli":
                cache = store if args.eval_cache == "warm" else root / f"eval-store-cold-{r}"
                if args.eval_cache == "cold":  # empty, also when --data-dir is reused from an earlier command
                    shutil.rmtree(cache, ignore_errors=True)
                res = run_cli(spec, out, args.threads, cache)
            else:
                res = run_open_clip(spec, out, args.threads)
            res.update(held_out(spec, system, out))
            print(f"{system} run {r + 1}: {json.dumps(res)}", file=sys.stderr)
            runs[system].append(res)
    return runs


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}x / {median(values):.2f}x / {max(values):.2f}x"


def report(runs: dict[str, list[dict]], args: argparse.Namespace, head: str) -> str:
    samples = args.epochs * (args.train // args.batch) * args.batch
    rows = []
    for system, rs in runs.items():
        rows.append([system, " / ".join(f"{r['wall_s']:.1f}" for r in rs), " / ".join(f"{r['cpu_s']:.1f}" for r in rs),
                     f"{median(samples / r['wall_s'] for r in rs):.1f}", " / ".join(f"{r['load']:.2f}" for r in rs),
                     f"{median(r['R@1'] for r in rs):.4f}", f"{median(r['R@5'] for r in rs):.4f}"])
    ours, peer = runs["ours-cli"], runs["open_clip"]
    wall = [p["wall_s"] / o["wall_s"] for o, p in zip(ours, peer, strict=True)]
    cpu = [p["cpu_s"] / o["cpu_s"] for o, p in zip(ours, peer, strict=True)]
    r1 = median(o["R@1"] for o in ours) - median(p["R@1"] for p in peer)
    rows.append(["ours-cli / open_clip (min / median / max of the pairs)", _spread(wall), _spread(cpu), "", "",
                 f"{r1:+.4f}", ""])
    headers = ["system", "wall s per run", "CPU s per run", "whole-process samples/s (median)",
               "1-min load at start", "t->i R@1 (median)", "t->i R@5 (median)"]
    return (f"{head}Base-evaluation store: {args.eval_cache}. Ratios: open_clip's seconds / ours, per alternating "
            f"pair.\n\n" + markdown_table(headers, rows))
