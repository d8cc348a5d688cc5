"""`clip-finetune runs list|status|logs NAME`: look at runs started with the Python API (api.fit)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_runs_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `runs` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("runs", help="list the runs started with the Python API; a run's status or logs",
                              description="The runs that fit() of the Python API started (docs/python-api.md).")
    p.add_argument("--runs-dir", help=RUNS_DIR_HELP)
    sub = p.add_subparsers(dest="runs_command", required=True, metavar="{list,status,logs}")
    s = sub.add_parser("list", help="every run: name, status, progress, creation time, details")
    _runs_dir_here_too(s)
    s = sub.add_parser("status", help="a run's status as JSON")
    s.add_argument("name", help="the run's name (`clip-finetune runs list` shows them)")
    _runs_dir_here_too(s)
    s = sub.add_parser("logs", help="a run's log")
    s.add_argument("name", help="the run's name (`clip-finetune runs list` shows them)")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing until the run has ended")
    _runs_dir_here_too(s)
    return p


RUNS_DIR_HELP = "runs folder (default: $CLIP_FINETUNE_RUNS_DIR, else ./runs)"


def _runs_dir_here_too(p: argparse.ArgumentParser) -> None:
    """`runs list --runs-dir X` as well as `runs --runs-dir X list` (SUPPRESS: absent here, the other one counts)."""
    p.add_argument("--runs-dir", default=argparse.SUPPRESS, help=RUNS_DIR_HELP)


def _progress(state: dict[str, Any]) -> str:
    p = state.get("progress")
    return f"{p.get('epoch', '?')}/{p.get('num_epochs', '?')}" if isinstance(p, dict) and p else "-"


def _row(state: dict[str, Any]) -> tuple[str, ...]:
    """A run's line: fields a damaged or hand-written state lacks show as '-', printed repr-safe (no escape codes)."""
    cells = (state.get("name"), state.get("status"), _progress(state), state.get("created_at"), state.get("details"))
    return tuple("-" if c is None else printable(str(c)) for c in cells)


def printable(text: str) -> str:
    """`text` as one terminal line: with a control character (an escape code, a newline that would forge a line)
    it prints as its repr, escapes visible."""
    return text if text.isprintable() else repr(text)


def cmd_runs(args: argparse.Namespace) -> int:
    from ..api.run import get_run, list_runs

    if args.runs_command == "list":
        states = [r.status() for r in list_runs(args.runs_dir)]
        if not states:
            print("no runs")
            return 0
        rows = [("NAME", "STATUS", "EPOCH", "CREATED", "DETAILS")]
        rows += [_row(s) for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
        return 0
    run = get_run(args.name, args.runs_dir)
    if args.runs_command == "status":
        print(json.dumps(run.status(), indent=2))
        return 0
    if args.follow:
        for line in run.stream_logs():
            print(line, flush=True)
    else:
        print(run.logs(), end="")
    return 0
