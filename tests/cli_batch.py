"""Run many `clip-finetune` command lines in ONE Python process (the package imports once, not once a case):
`python tests/cli_batch.py CASES.json`. CASES.json is a list of argument lists; for each, one JSON line is printed
as soon as it ends: {"argv", "rc", "out", "err", "traceback", "hung", "seconds"}. A case still running after
CASE_TIMEOUT seconds is stopped and reported hung (then the next one runs), so a hang fails its own test.

Not a test module: tests/test_bad_input.py starts it with subprocess (exit codes and messages asserted).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import sys
import time
import traceback

CASE_TIMEOUT = 60


class Hung(BaseException):
    """Raised by the alarm in a case that ran too long (a BaseException: no `except Exception` swallows it)."""


def _alarm(signum: int, frame: object) -> None:
    raise Hung


def run_case(argv: list[str]) -> dict:
    from adapters.clip_finetune.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    result = {"argv": argv, "rc": None, "traceback": None, "hung": False}
    handler = logging.StreamHandler(err)  # the package logs to stderr: keep each case's lines with it
    logging.getLogger().addHandler(handler)
    signal.alarm(CASE_TIMEOUT)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result["rc"] = main(argv)
    except Hung:
        result["hung"] = True
    except SystemExit as e:  # argparse refusing an argument: exit code 2 and its usage line
        result["rc"] = e.code
    except BaseException:  # an exception that escaped main(): what a user would see as a traceback
        result["traceback"] = traceback.format_exc()
    finally:
        signal.alarm(0)
        logging.getLogger().removeHandler(handler)
    return {**result, "out": out.getvalue(), "err": err.getvalue(), "seconds": round(time.perf_counter() - started, 2)}


def main() -> int:
    signal.signal(signal.SIGALRM, _alarm)
    logging.basicConfig(level=logging.WARNING)
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    for argv in cases:
        print(json.dumps(run_case(argv)), flush=True)
    return 0


if __name__ == "__main__":
    from adapters.clip_finetune.machine import exit_process

    exit_process(main())  # as the command itself ends: without the interpreter's last garbage collection
