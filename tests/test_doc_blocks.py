"""The docs' Python blocks import what exists, and the tests the docs cite exist (doc rot found by pytest, not by
a reader: docs/scale.md once imported load_embeddings from a module that no longer had it)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re

import pytest
from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _package_imports() -> list[tuple[str, str, list[str]]]:
    """(doc, module, names) of every import of the package in a ```python block of the docs."""
    found = []
    for doc in DOCS:
        for block in BLOCK.findall(doc.read_text(encoding="utf-8")):
            code = "\n".join(line.removeprefix(">>> ").removeprefix("... ") for line in block.splitlines())
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapters"):
                    found.append((doc.name, node.module, [a.name for a in node.names]))
                elif isinstance(node, ast.Import):
                    found += [(doc.name, a.name, []) for a in node.names if a.name.startswith("adapters")]
    return found


IMPORTS = _package_imports()


def test_the_docs_hold_python_blocks_that_import_the_package() -> None:
    assert len(IMPORTS) >= 5  # the extraction itself works: an empty list would pass the next test vacuously
    assert {"scale.md", "README.md"} <= {doc for doc, _, _ in IMPORTS}


@pytest.mark.parametrize(("doc", "module", "names"), IMPORTS, ids=[f"{d}:{m}" for d, m, _ in IMPORTS])
def test_every_import_in_the_docs_python_blocks_works(doc: str, module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    is_package = hasattr(mod, "__path__")  # `from package import submodule` names a module, not an attribute
    missing = [n for n in names
               if not hasattr(mod, n) and not (is_package and importlib.util.find_spec(f"{module}.{n}"))]
    assert not missing, f"{doc}: {module} has no {', '.join(missing)}"


def _cited_tests() -> list[tuple[str, str, str]]:
    """(doc, test file, test name) of every `test_x.py::test_y` (and a following `::test_z`) the docs cite."""
    cited = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"`(test_\w+\.py)((?:::\w+)?)`((?:,\s*`::\w+`)*)", text):
            names = [m.group(2), *re.findall(r"`::(\w+)`", m.group(3))]
            cited += [(doc.name, m.group(1), n.strip(":")) for n in names]
    return cited


def test_every_test_the_docs_cite_exists() -> None:
    cited = _cited_tests()
    assert any(doc == "reliability.md" for doc, _, _ in cited)
    gone = [f"{doc} cites {file}::{name}" for doc, file, name in cited
            if not (REPO / "tests" / file).is_file()
            or (name and f"def {name}(" not in (REPO / "tests" / file).read_text(encoding="utf-8"))]
    assert not gone, "\n".join(gone)


def test_no_doc_says_an_oversized_batch_is_rejected() -> None:
    # training.optim.check_sizes lowers a train_batch_size larger than the training set, with a warning
    for doc in (REPO / "docs" / "reliability.md", REPO / "docs" / "python-api.md"):
        text = " ".join(doc.read_text(encoding="utf-8").split())
        assert "batch larger than the training set are rejected" not in text
        assert "a batch larger than the data) makes the run **fail**" not in text
        assert "lowered" in text or "lowers" in text
