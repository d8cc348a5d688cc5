"""The docs that describe the code are checked against it."""

from __future__ import annotations

import re

from helpers import REPO

from adapters.clip_finetune.cli.config_args import markdown_reference
from adapters.clip_finetune.cli.main import build_parser


def test_configuration_reference_is_current() -> None:
    assert markdown_reference() in (REPO / "docs" / "configuration.md").read_text()


def test_readme_starts_with_the_demo_and_test_commands_that_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^```(?:bash|sh)\n(.*?)\n```", readme[:2500], flags=re.S | re.M)
    assert len(commands) >= 2
    demo, tests = commands[0], commands[1]
    assert "pip install" in demo and "clip-finetune demo" in demo
    assert "pip install" in tests and "pytest" in tests
    # .ci/run runs exactly the README's test command
    assert tests.strip() in (REPO / ".ci" / "run").read_text()


def test_readme_documents_every_subcommand() -> None:
    readme = (REPO / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"clip-finetune {name}" in readme, name
