"""The core never imports dtlpy (the project's dependency rule): every module outside dataloop/ imports with dtlpy
blocked; nor does it need the optional trackers (mlflow, wandb), blocked in the same child (one process start
for both rules)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from helpers import REPO

import adapters.clip_finetune as package

PLATFORM = f"{package.__name__}.dataloop"  # the one folder allowed to import dtlpy
ENTRY_POINTS = {f"{package.__name__}.__main__"}  # runs the CLI on import; cli is imported (and checked) on its own

# A meta-path finder first in line: any import of dtlpy, mlflow or wandb (or a submodule) raises ImportError, as
# on a machine without them. The child imports each module, then reports which imported and whether one of the
# blocked packages got loaded.
_CHILD = """
import importlib, json, sys

BLOCKED = ("dtlpy", "mlflow", "wandb")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name.split('.')[0]} is blocked in this test (imported as {name!r})")
        return None

sys.meta_path.insert(0, Block())
results = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        results[name] = "ok"
    except ImportError as e:
        results[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"results": results, "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))}))
from adapters.clip_finetune.machine import exit_process
exit_process(0)  # as the command ends: without the last garbage collection (~1.5 s)
"""


def core_modules() -> list[str]:
    names = {m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")}
    return sorted(n for n in names - ENTRY_POINTS if n != PLATFORM and not n.startswith(f"{PLATFORM}."))


def import_blocked(modules: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, *modules], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_core_module_imports_with_dtlpy_and_the_trackers_blocked() -> None:
    modules = core_modules()
    # the adapter is the control: it needs dtlpy, so it must fail to import in the same child
    report = import_blocked([*modules, f"{PLATFORM}.adapter"])

    assert len(modules) >= 10, modules  # the package layout was found (config, data, model, train, ...)
    assert {m: r for m, r in report["results"].items() if m in modules and r != "ok"} == {}
    assert report["results"][f"{PLATFORM}.adapter"].startswith("ImportError: dtlpy is blocked")
    assert report["loaded"] == []  # neither dtlpy nor a tracker, which training opens only when chosen
