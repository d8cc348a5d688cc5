"""The core never imports dtlpy (the project's dependency rule): every module outside dataloop/ imports with dtlpy
blocked."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from helpers import REPO

import adapters.clip_finetune as package

PLATFORM = f"{package.__name__}.dataloop"  # the one folder allowed to import dtlpy
ENTRY_POINTS = {f"{package.__name__}.__main__"}  # runs the CLI on import; cli is imported (and checked) on its own

# A meta-path finder first in line: any import of dtlpy (or a submodule) raises ImportError, as on a machine
# without it. The child imports each module, then reports which imported and whether dtlpy got loaded.
_CHILD = """
import importlib, json, sys

class BlockDtlpy:
    def find_spec(self, name, path=None, target=None):
        if name == "dtlpy" or name.startswith("dtlpy."):
            raise ImportError(f"dtlpy is blocked in this test (imported as {name!r})")
        return None

sys.meta_path.insert(0, BlockDtlpy())
results = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        results[name] = "ok"
    except ImportError as e:
        results[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"results": results, "dtlpy_loaded": any(m.split(".")[0] == "dtlpy" for m in sys.modules)}))
"""


def core_modules() -> list[str]:
    names = {m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")}
    return sorted(n for n in names - ENTRY_POINTS if n != PLATFORM and not n.startswith(f"{PLATFORM}."))


def import_blocked(modules: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, *modules], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_core_module_imports_with_dtlpy_blocked() -> None:
    modules = core_modules()
    # the adapter is the control: it needs dtlpy, so it must fail to import in the same child
    report = import_blocked([*modules, f"{PLATFORM}.adapter"])

    assert len(modules) >= 10, modules  # the package layout was found (config, data, model, train, ...)
    assert {m: r for m, r in report["results"].items() if m in modules and r != "ok"} == {}
    assert report["results"][f"{PLATFORM}.adapter"].startswith("ImportError: dtlpy is blocked")
    assert report["dtlpy_loaded"] is False
