"""The help is true: checked against the parser itself, so a new command or option cannot go undocumented."""

from __future__ import annotations

import argparse

import pytest

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.cli.parser import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _every_parser() -> list[tuple[str, argparse.ArgumentParser]]:
    found, todo = [], [("clip-finetune", build_parser())]
    while todo:
        name, parser = todo.pop()
        found.append((name, parser))
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            todo += [(f"{name} {sub}", p) for sub, p in _subparsers(parser).items()]
    return found


def test_the_top_level_help_lists_every_command_and_no_developer_notes(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for command in _subparsers(build_parser()):
        assert f"\n  {command} " in out, command
    assert "Thin:" not in out and "clip-finetune doctor" in out


@pytest.mark.parametrize(("name", "parser"), _every_parser(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_and_argument_is_described(name: str, parser: argparse.ArgumentParser) -> None:
    skip = argparse._HelpAction | argparse._SubParsersAction
    undescribed = [a.dest for a in parser._actions if not isinstance(a, skip) and not (a.help or "").strip()]
    assert undescribed == []
    assert parser.format_help()  # renders


def test_options_with_a_default_say_it() -> None:
    parsers = dict(_every_parser())
    for name, parser in parsers.items():
        for action in parser._actions:
            shown = action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings
            if shown and not isinstance(action, argparse._HelpAction):
                assert "default" in action.help, f"{name} {action.option_strings}"
    search = parsers["clip-finetune search"].format_help()
    assert "sharded folder" in search and "(default: 5)" in search


def test_runs_takes_runs_dir_before_and_after_its_command(tmp_path, capsys) -> None:
    assert main(["runs", "list", "--runs-dir", str(tmp_path)]) == 0
    assert main(["runs", "--runs-dir", str(tmp_path), "list"]) == 0
    assert capsys.readouterr().out == "no runs\nno runs\n"
    assert main(["runs", "status", "missing", "--runs-dir", str(tmp_path)]) == 2
    assert "--runs-dir DIR on the command line" in capsys.readouterr().err
