"""The package's layout holds (README, "Code map"): imports point one way through the layers, no import loop,
dtlpy only in dataloop/, and files and functions stay small. Read from the source with ast, lazy imports
inside functions included."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "adapters.clip_finetune"
ROOT = Path(__file__).resolve().parents[1] / "adapters" / "clip_finetune"
# Lower layers never import higher ones; folders of one layer do not import each other.
LAYERS = {
    # the ground floor
    "architecture": 0, "config": 0, "errors": 0, "files": 0, "inputs": 0, "machine": 0, "progress": 0, "sections": 0,
    "data": 1, "model": 1,
    "retrieval": 2,
    "training": 3,
    "app": 4,  # the use cases (train, evaluate, embed, search, export) the faces call
    "cli": 5, "api": 5, "dataloop": 5,  # the faces
    "__init__": 6, "__main__": 6,  # the package's public face and `python -m`
}
GROUND = 0  # its files (config, errors, files, inputs, machine) may use one another
ALLOWED_ACROSS = {("cli", "api")}  # `clip-finetune runs` shows the runs the Python API starts
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([PACKAGE, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The package modules (and outside top-level packages) `name` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                yield sub if sub in known else target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in imports_of(name, path, known) if t in known and t != name}
            for name, path in known.items()}


def component(module: str) -> str:
    rest = module.removeprefix(PACKAGE).lstrip(".")
    return rest.split(".")[0] if rest else "__init__"


def test_every_module_has_a_layer() -> None:
    assert {component(m) for m in modules()} <= set(LAYERS)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for source, targets in graph().items():
        for target in targets:
            a, b = component(source), component(target)
            if a == b or (a, b) in ALLOWED_ACROSS:
                continue
            same_floor = LAYERS[a] == LAYERS[b]
            if LAYERS[b] > LAYERS[a] or (same_floor and LAYERS[a] != GROUND):
                wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_no_import_loop() -> None:
    edges = graph()
    loops, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                loops.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert loops == []


def test_only_dataloop_imports_dtlpy() -> None:
    known = modules()
    importers = {name for name, path in known.items()
                 if any(t.split(".")[0] == "dtlpy" for t in imports_of(name, path, known))}
    assert importers and all(component(m) == "dataloop" for m in importers), sorted(importers)


@pytest.mark.parametrize("name", sorted(modules()))
def test_files_and_functions_stay_small(name: str) -> None:
    path = modules()[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_checks_see_a_loop_and_a_wrong_way_import(tmp_path, monkeypatch) -> None:
    """The walk itself works: a planted loop and an import running up the layers are found."""
    pkg = tmp_path / "adapters" / "clip_finetune"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from .b import x\nfrom ..training import fit\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "training").mkdir()
    (pkg / "training" / "__init__.py").write_text("fit = None\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    edges = graph()
    assert edges[f"{PACKAGE}.data.a"] == {f"{PACKAGE}.data.b", f"{PACKAGE}.training"}
    assert edges[f"{PACKAGE}.data.b"] == {f"{PACKAGE}.data.a"}
    with pytest.raises(AssertionError):
        test_no_import_loop()
    with pytest.raises(AssertionError):
        test_imports_point_down_the_layers()
