"""Where a `clip-finetune` process spends its CPU time, by phase: the command runs in this process with the
functions that do each phase wrapped in timers (time.process_time, all of the process's threads: what load from
other processes changes least; and wall time). The modules the command imports anyway are imported first, as the
"imports" phase.

    OMP_NUM_THREADS=1 python -m bench.profile_cli -- train --data DOWNLOAD --out MODEL --set ...

Phases nest (the first decode is inside the first epoch, the base evaluation inside "start"): the table gives
each one's inclusive CPU seconds and share of the process. Under load from other processes, run it on one thread:
with two, a waiting OpenMP thread spins while its partner is descheduled, which counts as CPU time.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import pstats
import resource
import sys
import time
from collections import defaultdict

from bench.common import markdown_table

# phase: (module, function) whose calls are timed (CPU and wall, inclusive); patched where the caller looks it up
PHASES: dict[str, tuple[str, str]] = {
    "reading the download + data checks": ("adapters.clip_finetune.app.train", "load_splits"),
    "  of which: reading items/ + json/": ("adapters.clip_finetune.data.load", "read_subset"),
    "model load (build + weights)": ("adapters.clip_finetune.model.clip", "load_model"),
    "report examples (embedding, before / after)": ("adapters.clip_finetune.cli.examples", "embed_examples"),
    "report examples (writing)": ("adapters.clip_finetune.cli.examples", "save_examples"),
    "run set-up (caches, optimizer, run identity)": ("adapters.clip_finetune.training.loop", "_setup"),
    "base evaluation + first model write (start)": ("adapters.clip_finetune.training.loop", "_start"),
    "training epochs (steps + data)": ("adapters.clip_finetune.training.loop", "_train_epoch"),
    "  of which: training steps": ("adapters.clip_finetune.training.loop", "train_step"),
    "  of which: decoding into the training cache": ("adapters.clip_finetune.data.decode_cache", "load_reduced"),
    "evaluations (base, then after each epoch)": ("adapters.clip_finetune.training.loop", "_validate"),
    "checkpoints (each epoch)": ("adapters.clip_finetune.training.loop", "_save_checkpoint"),
    "model writes (each new best)": ("adapters.clip_finetune.training.loop", "save_artifact"),
    "per-query files": ("adapters.clip_finetune.training.loop", "write_per_query"),
    "finish (best weights back, final scoring, final write)": ("adapters.clip_finetune.training.loop", "_finish"),
    "data report + model card": ("adapters.clip_finetune.training.fit", "_write_data_report"),
}
# imported first, as one phase: what the command imports anyway (torch, torchvision, open_clip with timm and
# transformers, this project's modules)
IMPORTS = ("torch", "torchvision", "open_clip", "adapters.clip_finetune.cli.main", "adapters.clip_finetune.app.train",
           "adapters.clip_finetune.training.fit", "adapters.clip_finetune.training.loop",
           "adapters.clip_finetune.cli.examples", "adapters.clip_finetune.data.dataloop")


class Timings:
    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def wrap(self, phase: str, module: str, name: str) -> None:
        mod = importlib.import_module(module)
        fn = getattr(mod, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls[phase].append((time.process_time() - c0, time.perf_counter() - t0))

        setattr(mod, name, timed)

    def rows(self, total_cpu: float, total_wall: float) -> list[list[str]]:
        rows = []
        for phase, calls in self.calls.items():
            cpu, wall = sum(c for c, _ in calls), sum(w for _, w in calls)
            each = " / ".join(f"{c:.2f}" for c, _ in calls) if 1 < len(calls) <= 12 else ""
            rows.append([phase, f"{cpu:.2f}", f"{cpu / total_cpu:.1%}", f"{wall:.2f}", f"{wall / total_wall:.1%}",
                         str(len(calls)), each])
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cprofile", help="also run under cProfile (CPU clock) and write its pstats here; it "
                        "inflates Python-heavy phases several times, so the table's figures come without it")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="clip-finetune's arguments, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    timings, start_cpu = Timings(), time.process_time()  # the interpreter's start-up before this is not counted
    c0, t0 = time.process_time(), time.perf_counter()
    for module in IMPORTS:
        importlib.import_module(module)
    timings.calls["imports (torch, torchvision, open_clip, ours)"].append((time.process_time() - c0,
                                                                          time.perf_counter() - t0))
    for phase, (module, name) in PHASES.items():
        timings.wrap(phase, module, name)
    from adapters.clip_finetune.cli.main import main as cli_main

    if args.cprofile:
        profile = cProfile.Profile(time.process_time)
        code = profile.runcall(cli_main, command)
        pstats.Stats(profile).dump_stats(args.cprofile)
    else:
        code = cli_main(command)
    cpu, wall = time.process_time(), time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"process CPU {cpu:.2f} s (user {usage.ru_utime:.2f} + system {usage.ru_stime:.2f}; {start_cpu:.2f} s "
          f"before this module ran), wall {wall:.2f} s from the imports on; exit {code}; 1-min load {_load()}; "
          f"{torch_threads()} torch threads")
    print(markdown_table(["phase", "CPU s", "share of process CPU", "wall s", "share of wall", "calls",
                          "CPU s per call"], timings.rows(cpu, wall)))
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
