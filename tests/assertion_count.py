"""Count what the tests assert, per file: `assert` statements and `pytest.raises` blocks (AST, not text).

Run before and after moving tests between files to see that none were dropped:

    python3 tests/assertion_count.py            # per file, then the total
    python3 tests/assertion_count.py --json     # {file: {"assert": n, "raises": n, "tests": n}}

An assert inside a helper counts once however many tests call it; a parametrized test counts once.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_raises(node: ast.AST) -> bool:
    """`pytest.raises(...)` (a call; `with` or not)."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "raises"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "pytest")


def count(path: Path) -> dict[str, int]:
    """Asserts, pytest.raises calls and test functions in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = list(ast.walk(tree))
    return {
        "assert": sum(isinstance(n, ast.Assert) for n in nodes),
        "raises": sum(_is_raises(n) for n in nodes),
        "tests": sum(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
                     for n in nodes),
    }


def count_all(folder: Path = TESTS) -> dict[str, dict[str, int]]:
    """count() of every Python file under `folder` (helpers and the stand-in platform included: they assert too)."""
    return {str(p.relative_to(folder)): count(p) for p in sorted(folder.rglob("*.py"))}


def main(argv: list[str]) -> int:
    counts = count_all()
    if "--json" in argv:
        print(json.dumps(counts, indent=1))
        return 0
    for name, c in counts.items():
        if any(c.values()):
            print(f"{name:45} {c['assert']:5} assert {c['raises']:4} raises {c['tests']:4} tests")
    totals = {k: sum(c[k] for c in counts.values()) for k in ("assert", "raises", "tests")}
    print(f"{'total':45} {totals['assert']:5} assert {totals['raises']:4} raises {totals['tests']:4} tests")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
