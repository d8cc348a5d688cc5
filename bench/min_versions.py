"""Are pyproject.toml's floors true? Build a virtualenv with exactly the declared minimum versions (each `>=X`
becomes `==X`; pytest at its floor too) and run the adapter tests in it against this checkout.

    python -m bench.min_versions                      # python3.10 (requires-python's floor), a temporary venv
    python -m bench.min_versions --python python3.11 --venv /tmp/minvenv --keep
    python -m bench.min_versions --tests tests/test_adapter.py

The first run downloads the old wheels (PyPI's torch for x86_64 is a CUDA build: about 3 GB with its nvidia
libraries). Prints the installed versions and the pytest summary as markdown (docs/dataloop.md keeps the last
result); exits with pytest's status.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT

ADAPTER_TESTS = [
    "tests/test_adapter.py",
    "tests/test_adapter_retrain.py",
    "tests/test_pipeline_run.py",
    "tests/test_readme_sdk.py",
    "tests/test_manifest.py",
]
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*$")


def floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{package: minimum version} of the runtime dependencies, and pytest's from the test extra."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = [*project["dependencies"], *[s for s in project["optional-dependencies"]["test"]
                                         if s.startswith("pytest")]]
    out = {}
    for spec in specs:
        match = FLOOR.match(spec)
        if not match:
            raise SystemExit(f"{pyproject}: {spec!r} is not 'name>=version': no floor to test")
        out[match[1]] = match[2]
    return out


def build(venv: Path, python: str, pins: dict[str, str]) -> None:
    """Create the venv unless it exists, then install exactly the pins (a kept venv follows changed floors)."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "--prefer-binary", *[f"{k}=={v}" for k, v in pins.items()]], check=True)


def installed(venv: Path, names: list[str]) -> dict[str, str]:
    freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout
    versions = dict(line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    canon = {k.lower().replace("_", "-"): v for k, v in versions.items()}
    return {n: canon.get(n.lower().replace("_", "-"), "?") for n in names}


def run_tests(venv: Path, tests: list[str]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATALOOP_PATH": tempfile.mkdtemp(prefix="dataloop-min-")}
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-15:]
    return proc.returncode, "\n".join(tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="python3.10", help="interpreter of the venv (default: python3.10)")
    parser.add_argument("--venv", type=Path, help="where to build it (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the venv (reused when it exists)")
    parser.add_argument("--tests", nargs="+", default=ADAPTER_TESTS)
    args = parser.parse_args(argv)
    pins = floors()
    venv = args.venv or Path(tempfile.mkdtemp(prefix="clip-min-versions-")) / "venv"
    started = time.monotonic()
    build(venv, args.python, pins)
    built = time.monotonic()
    code, summary = run_tests(venv, args.tests)
    version = subprocess.run([str(venv / "bin" / "python"), "--version"], capture_output=True, text=True).stdout
    print(f"Python {version.split()[-1]}; " + ", ".join(f"{k}=={v}" for k, v in installed(venv, list(pins)).items()))
    took = time.monotonic() - built
    print(f"venv built in {built - started:.0f} s, tests ran in {took:.0f} s: {' '.join(args.tests)}")
    print(summary)
    if not args.keep:
        shutil.rmtree(venv, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
