"""The GPU benchmark's smoke mode runs on a CPU and writes its table (bench/gpu.py; the numbers are a GPU's job)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_writes_the_table(tmp_path):
    out = tmp_path / "gpu.md"
    # the last step (every setting on: fused AdamW, bf16, channels_last, compile) and a peer: all the wiring
    rows = "+ torch.compile,open_clip amp_bf16"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--tiny", "--rows", rows,
                           "--out", str(out), "--data-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert "| trainer / settings | train samples/s (steady) |" in table and "GFLOP" in table
    lines = {ln.split("|")[1].strip(): ln.split("|")[2:-1] for ln in table.splitlines() if ln.startswith("| ")}
    assert set(lines) >= {"+ torch.compile", "open_clip amp_bf16"}
    compiled = lines["+ torch.compile"]
    assert float(compiled[0]) > 0 and float(compiled[4]) > 0 and float(compiled[5]) > 0  # trained, embedded
    assert float(lines["open_clip amp_bf16"][0]) > 0
