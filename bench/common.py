"""Shared by the benchmarks: peak RSS and machine facts read from /proc, synthetic JPEGs, markdown tables."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from adapters.clip_finetune.data.synthetic import SyntheticSample, render, sample_specs

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "adapters" / "clip_finetune" / "model_configs" / "clip-tiny.json"
RESULT_PREFIX = "BENCH_RESULT "  # a child process prints its result as one JSON line after this prefix


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of a process in MiB, from /proc (Linux); NaN elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cores() -> int:
    from adapters.clip_finetune.machine import cpu_cores

    return cpu_cores()


def machine() -> str:
    """'2 CPU cores (AMD EPYC), no GPU, torch 2.x, Python 3.x, 2026-01-01 12:00 UTC' from /proc/cpuinfo."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{cores()} CPU cores ({model}), {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {when}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def photo(sample: SyntheticSample, width: int, height: int) -> Image.Image:
    """A synthetic sample as a photo-sized image: the square rendering centred on its background, with
    sensor-like noise so the JPEG has a photo's size (entropy decoding is most of a JPEG's decode time)."""
    side = min(width, height)
    square = render(sample, 128).resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, height), square.getpixel((0, 0)))
    canvas.paste(square, ((width - side) // 2, (height - side) // 2))
    rng = np.random.default_rng(sample.seed)
    pixels = np.asarray(canvas, dtype=np.float32) + 2.5 * rng.standard_normal((height, width, 3), np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def write_jpegs(folder: Path, n: int, seed: int, width: int, height: int) -> list[tuple[str, str]]:
    """n JPEGs (quality 90) of synthetic samples in `folder`; returns (path, caption) pairs. Reuses files."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, sample in enumerate(sample_specs(n, seed)):
        path = folder / f"{i:06d}.jpg"
        if not path.is_file():
            photo(sample, width, height).save(path, "JPEG", quality=90)
        out.append((str(path), sample.caption))
    return out


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def run_child(module: str, spec: dict, threads: int) -> dict:
    """Run `python -m module --child SPEC_JSON` with `threads` torch/OpenMP threads; return its result plus
    the parent-measured wall time (process start to exit, imports included)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:  # too long for a command line
        json.dump(spec, f)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, "--child", f.name], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    Path(f.name).unlink()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} child {spec.get('system')} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1][len(RESULT_PREFIX):]), "wall_s": wall}


def load_spec(arg: str) -> dict:
    """A child's spec: the JSON file run_child wrote (or inline JSON)."""
    return json.loads(arg if arg.lstrip().startswith("{") else Path(arg).read_text())


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def serve_child(arg: str, child_for: Callable[[str], Callable[[dict], dict]]) -> int:
    """The child side of run_child: read the spec `arg` names, run child_for(its system) on it, emit the result."""
    spec = load_spec(arg)
    emit(child_for(spec["system"])(spec))
    return 0
