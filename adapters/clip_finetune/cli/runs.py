"""`clip-finetune runs list|status|logs NAME`: look at runs started with the Python API (api.fit)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_runs_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `runs` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("runs", help="list the runs started with the Python API; a run's status or logs")
    p.add_argument("--runs-dir", help="runs folder (default: $CLIP_FINETUNE_RUNS_DIR, else ./runs)")
    sub = p.add_subparsers(dest="runs_command", required=True)
    sub.add_parser("list", help="every run: name, status, progress, creation time, details")
    s = sub.add_parser("status", help="a run's status as JSON")
    s.add_argument("name")
    s = sub.add_parser("logs", help="a run's log")
    s.add_argument("name")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing until the run has ended")
    return p


def _progress(state: dict[str, Any]) -> str:
    p = state.get("progress") or {}
    return f"{p['epoch']}/{p['num_epochs']}" if p else "-"


def cmd_runs(args: argparse.Namespace) -> int:
    from ..api.run import get_run, list_runs

    if args.runs_command == "list":
        states = [r.status() for r in list_runs(args.runs_dir)]
        if not states:
            print("no runs")
            return 0
        rows = [("NAME", "STATUS", "EPOCH", "CREATED", "DETAILS")]
        rows += [(s["name"], s["status"], _progress(s), s["created_at"], s["details"]) for s in states]
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
