"""`clip-finetune doctor`: what fine-tuning on this machine would use, and what would fail, in one screen."""

from __future__ import annotations

import importlib
import platform
import shutil
import subprocess
import sys
import zipfile
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
    checks = _packages()
    broken = _imports(checks)
    if "torch" not in broken:
        _device(checks, cfg)
    if not broken & {"torch", "open_clip"}:
        _weights(checks, cfg)
    _disk(checks, Path(out))
    return checks


def doctor_without_config(error: BaseException, out: str | Path = ".") -> Checks | None:
    """The report when the configuration itself could not be read because torch or open_clip cannot be imported
    (validating a model name imports open_clip); None when the imports work (a plain bad configuration)."""
    checks = _packages()
    if not _imports(checks):
        return None
    checks.add("problem", "configuration", f"not checked: {str(error)[:300]}")
    _disk(checks, Path(out))
    return checks


def _packages() -> Checks:
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
    return checks


def _imports(checks: Checks) -> set[str]:
    """Import what a run imports: an installed package that cannot import (a broken wheel, a missing shared
    library, a version clash) is a problem, not a crash of doctor. Returns the modules that failed."""
    broken = set()
    for module in ("torch", "open_clip"):
        try:
            importlib.import_module(module)
        except Exception as e:  # any failure of the import is the report: ImportError, OSError, RuntimeError, ...
            broken.add(module)
            checks.add("problem", f"import {module}", f"fails: {type(e).__name__}: {str(e)[:200]}; reinstall it "
                       f"(pip install --force-reinstall {_DISTRIBUTION[module]})")
    # dtlpy in a child process: only dataloop/ imports it here, and its import writes under $DATALOOP_PATH
    try:
        child = subprocess.run([sys.executable, "-c", "import dtlpy"], capture_output=True, text=True, timeout=120)
        failure = child.stderr.strip().splitlines()[-1:] if child.returncode else []
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = [f"{type(e).__name__}: {e}"]
    if failure:
        broken.add("dtlpy")
        checks.add("problem", "import dtlpy", f"fails: {failure[0][:200]}; the Dataloop app needs it; reinstall it "
                   "(pip install --force-reinstall dtlpy)")
    return broken


_DISTRIBUTION = {"torch": "torch", "open_clip": "open_clip_torch"}


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
    from ..model.safe_load import check_device

    try:  # meta, an absent mps or cuda:7 cannot run a model here: the run would stop at once
        device = check_device(torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    except ClipFinetuneError as e:
        checks.add("problem", "device", str(e))
        return
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
        problem = _local_weights_problem(Path(cfg.pretrained).expanduser())
        checks.add("problem" if problem else "ok", "weights", f"local {cfg.pretrained}" + (
            f": {problem}; set pretrained to a weights file or a saved model folder" if problem else ""))
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


def _local_weights_problem(path: Path) -> str | None:
    """Why `path` cannot be the pretrained weights (None when it looks like them): a saved model folder, a whole
    safetensors file, or torch's zip (or older pickle) format. Only the header is read: doctor stays quick."""
    from ..model.clip import is_artifact_dir
    from ..model.safe_load import check_safetensors

    if path.is_dir():
        return None if is_artifact_dir(path) else "a folder that is not a saved model (no open_clip_config.json)"
    if not path.is_file():
        return "not a regular file"
    if path.suffix == ".safetensors":
        try:
            check_safetensors(path, "pretrained")
        except ClipFinetuneError as e:
            return str(e)
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # torch.save's zip, or its pre-1.6 pickle
        return None
    return "not a weights file (neither safetensors nor torch's format)"


def _disk(checks: Checks, out: Path) -> None:
    folder = next((p for p in (out, *out.resolve().parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free / 2**30
    checks.add("ok" if free >= MIN_FREE_GB else "warning", "disk", f"{free:.1f} GB free in {folder.resolve()}"
               + ("" if free >= MIN_FREE_GB else f" (a ViT-B-32 run needs a few GB; keep {MIN_FREE_GB:g}+)"))
