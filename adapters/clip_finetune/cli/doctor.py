"""`clip-finetune doctor`: what fine-tuning on this machine would use, and what would fail, in one screen."""

from __future__ import annotations

import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from ..architecture import architecture_config
from ..config import FinetuneConfig
from ..errors import ClipFinetuneError
from ..machine import cpu_cores

# (distribution, what needs it) for the packages a run may use; the first group is always installed
REQUIRED = ("torch", "torchvision", "open_clip_torch", "dtlpy", "numpy", "pillow", "pydantic", "tqdm", "safetensors")
EXTRAS = {
    "multilingual": ("transformers",),
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "parquet": ("pandas", "pyarrow"),
    "index": ("usearch",),
    "test": ("pytest", "ruff"),
}
MIN_FREE_GB = 5.0  # a ViT-B-32 run writes ~0.6 GB of weights and a ~1.8 GB resume checkpoint


class Checks:
    """Lines of the report, each ok / warning / problem; problems make the exit code 1."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str]] = []

    def add(self, status: str, what: str, detail: str) -> None:
        self.lines.append((status, what, detail))

    @property
    def problems(self) -> int:
        return sum(1 for status, _, _ in self.lines if status == "problem")

    def render(self) -> str:
        width = max(len(what) for _, what, _ in self.lines)
        return "\n".join(f"{status:8s} {what:{width}s}  {detail}" for status, what, detail in self.lines)


def run_doctor(cfg: FinetuneConfig, out: str | Path = ".") -> Checks:
    checks = Checks()
    checks.add("ok", "python", f"{platform.python_version()} ({sys.executable})")
    checks.add("ok", "clip-finetune", _version("clip-finetune") or "not installed (running from a checkout)")
    for name in REQUIRED:
        version = _version(name)
        checks.add("ok" if version else "problem", name, version or "missing: pip install -e . in the checkout")
    for extra, names in EXTRAS.items():
        missing = [n for n in names if not _version(n)]
        checks.add("ok" if not missing else "warning", f"extra [{extra}]",
                   "installed" if not missing else f"missing {', '.join(missing)}: pip install -e \".[{extra}]\"")
    _device(checks, cfg)
    _weights(checks, cfg)
    _disk(checks, Path(out))
    return checks


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _device(checks: Checks, cfg: FinetuneConfig) -> None:
    import torch

    from ..model.precision import cpu_flags, resolve_precision

    cores = cpu_cores()
    flags = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags())
    checks.add("ok", "cpu", f"{cores} cores usable ({platform.machine()}; {flags or 'no bf16/AMX flags'})")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0)
        capability = f"{gpu.major}.{gpu.minor}"
        checks.add("ok", "cuda", f"{torch.cuda.device_count()} GPU(s): {gpu.name}, compute capability {capability}, "
                   f"{gpu.total_memory / 2**30:.0f} GiB")
    else:
        checks.add("warning" if cfg.device == "cuda" else "ok", "cuda", "no GPU visible: training runs on the CPU "
                   "(fine for the demo and small runs; a GPU is ~50x faster for ViT-B-32)")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:  # the CPU bf16 rule depends on the model's width
        model_cfg = architecture_config(cfg.model_name)
    except ClipFinetuneError:
        model_cfg = None
    training = resolve_precision(cfg.precision, device, model_cfg)
    embedding = training if device.type == "cuda" else "fp32"
    checks.add("ok", "precision", f"{cfg.precision!r}: {cfg.model_name} trains in {training} on {device}, embeds in "
               f"{embedding}")


def _weights(checks: Checks, cfg: FinetuneConfig) -> None:
    from ..model.hub import download_blocked, weights_source

    what = f"weights {cfg.model_name} / {cfg.pretrained}"
    if not cfg.pretrained:
        checks.add("ok", "weights", f"{cfg.model_name}: random init (nothing to download)")
        return
    if Path(cfg.pretrained).expanduser().exists():
        checks.add("ok", "weights", f"local {cfg.pretrained}")
        return
    # an architecture from a JSON file is registered under the file's stem (model/clip.py)
    name = Path(cfg.model_name).stem if cfg.model_name.endswith(".json") else cfg.model_name
    source = weights_source(name, cfg.pretrained)
    if source is None:
        checks.add("problem", "weights", f"{what}: not a pretrained tag, weights file or saved model folder")
    elif source.cached:
        checks.add("ok", "weights", f"{what}: cached at {source.cached}")
    elif (why := download_blocked(source)) is None:
        checks.add("ok", "weights", f"{what}: downloadable from {source.where} ({source.host} reachable)")
    else:
        checks.add("problem", "weights", f"{what}: not cached and {why}; copy the cache here or set pretrained to a "
                   "local weights file or saved model folder")


def _disk(checks: Checks, out: Path) -> None:
    folder = next((p for p in (out, *out.resolve().parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free / 2**30
    checks.add("ok" if free >= MIN_FREE_GB else "warning", "disk", f"{free:.1f} GB free in {folder.resolve()}"
               + ("" if free >= MIN_FREE_GB else f" (a ViT-B-32 run needs a few GB; keep {MIN_FREE_GB:g}+)"))
