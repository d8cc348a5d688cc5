"""Count what the tests assert, per file: `assert` statements, `pytest.raises` and `pytest.warns` blocks and
`pytest.fail` calls (AST, not text).

Run before and after moving tests between files to see that none were dropped:

    python3 tests/assertion_count.py                    # per file, then the total
    python3 tests/assertion_count.py --json > a.json    # {file: {"assert": n, "raises": n, "warns": n, ...}}
    python3 tests/assertion_count.py --diff a.json      # the files whose counts changed since a.json, and totals

An assert inside a helper counts once however many tests call it; a parametrized test counts once.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


KINDS = ("assert", "raises", "warns", "fail", "tests")


def _is_pytest_call(node: ast.AST, name: str) -> bool:
    """`pytest.<name>(...)` (a call; `with` or not)."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "pytest")


def count(path: Path) -> dict[str, int]:
    """Asserts, pytest.raises / pytest.warns / pytest.fail calls and test functions in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = list(ast.walk(tree))
    return {
        "assert": sum(isinstance(n, ast.Assert) for n in nodes),
        "raises": sum(_is_pytest_call(n, "raises") for n in nodes),
        "warns": sum(_is_pytest_call(n, "warns") for n in nodes),
        "fail": sum(_is_pytest_call(n, "fail") for n in nodes),
        "tests": sum(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
                     for n in nodes),
    }


def count_all(folder: Path = TESTS) -> dict[str, dict[str, int]]:
    """count() of every Python file under `folder` (helpers and the stand-in platform included: they assert too)."""
    return {str(p.relative_to(folder)): count(p) for p in sorted(folder.rglob("*.py"))}


def _line(name: str, c: dict[str, int]) -> str:
    return f"{name:45} " + " ".join(f"{c.get(k, 0):5} {k}" for k in KINDS)


def _totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    return {k: sum(c.get(k, 0) for c in counts.values()) for k in KINDS}


def main(argv: list[str]) -> int:
    counts = count_all()
    if "--json" in argv:
        print(json.dumps(counts, indent=1))
        return 0
    if "--diff" in argv:  # what changed since a saved --json: per file (before -> after), then the totals
        before = json.loads(Path(argv[argv.index("--diff") + 1]).read_text(encoding="utf-8"))
        for name in sorted(before.keys() | counts.keys()):
            old, new = before.get(name, {}), counts.get(name, {})
            if any(old.get(k, 0) != new.get(k, 0) for k in KINDS):
                print(f"{name:45} " + " ".join(f"{old.get(k, 0):4}->{new.get(k, 0):<4} {k}" for k in KINDS))
        old, new = _totals(before), _totals(counts)
        print(f"{'total':45} " + " ".join(f"{old[k]:4}->{new[k]:<4} {k}" for k in KINDS))
        return 0
    for name, c in counts.items():
        if any(c.values()):
            print(_line(name, c))
    print(_line("total", _totals(counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
