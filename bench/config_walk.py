"""The config walk: in how many of the package's files is a run's configuration read during `finetune()`?

A tiny training run (the tiny architecture, synthetic data, one epoch, one process) is given a configuration
whose class records, on every attribute read, the package file that read it (the first frame of the package on
the stack, so a read made for us by pydantic or dataclasses counts for the file that asked). Copies of it
(`model_copy`) and its sections (`cfg.model`, `cfg.optimisation` ...) record too. Printed: the files, with how
many reads each made and how often the walk moved from one file to another ("hops").

    python -m bench.config_walk            # the table
    python -m bench.config_walk --json     # {"files": N, "hops": H, "reads": {file: count}}

Issue 22 counted 27 files before the configuration was split into sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1] / "adapters" / "clip_finetune"
TINY_MODEL = PACKAGE / "model_configs" / "clip-tiny.json"
OWN = (PACKAGE / "config.py", PACKAGE / "sections.py")  # the configuration reading itself is no walk


class Walk:
    """The package files that read the configuration, in order of reading."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()
        self.order: list[str] = []
        self.on = False

    def record(self) -> None:
        if not self.on:
            return
        frame = sys._getframe(2)  # the caller of __getattribute__
        while frame is not None:
            path = Path(frame.f_code.co_filename)
            if path in OWN:  # a section being made (section_of): taking it was the read
                return
            if PACKAGE in path.parents:
                name = str(path.relative_to(PACKAGE))
                self.reads[name] += 1
                if not self.order or self.order[-1] != name:
                    self.order.append(name)
                return
            frame = frame.f_back

    def hops(self) -> int:
        return max(0, len(self.order) - 1)


WALK = Walk()


def _recording(cls: type) -> type:
    """A subclass of `cls` whose attribute reads are recorded, and whose sections record too."""
    from adapters.clip_finetune.sections import SECTIONS

    sections = dict.fromkeys(SECTIONS.values())

    def __getattribute__(self: Any, name: str) -> Any:  # noqa: N807
        value = object.__getattribute__(self, name)
        if not name.startswith("__"):
            WALK.record()
        if type(value) in sections:  # a section read of the configuration: it records too
            section = _RECORDING_SECTIONS[type(value)]
            return section(**{f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
        return value

    return type(f"Recording{cls.__name__}", (cls,), {"__getattribute__": __getattribute__})


_RECORDING_SECTIONS: dict[type, type] = {}


def measure(root: Path) -> Walk:
    from adapters.clip_finetune.config import FinetuneConfig, build_config
    from adapters.clip_finetune.data.load import Splits, load_dataset
    from adapters.clip_finetune.data.synthetic import write_dataloop_download
    from adapters.clip_finetune.sections import SECTIONS
    from adapters.clip_finetune.training import finetune

    for section in SECTIONS.values():
        _RECORDING_SECTIONS[section] = dataclasses.dataclass(frozen=True)(_recording(section))
    write_dataloop_download(root / "dev", 48, 16, seed=1)
    dev, _ = load_dataset(root / "dev")
    cfg = build_config({"model_name": str(TINY_MODEL), "pretrained": None, "num_epochs": 1, "train_batch_size": 16,
                        "num_workers": 0, "num_processes": 1, "batch_size": 16, "seed": 0})
    recording = _recording(FinetuneConfig)
    cfg = recording.model_construct(**dict(cfg))  # the same values, validated above; model_copy keeps the class
    WALK.on = True
    try:
        finetune(cfg, Splits(dev["train"], dev["validation"]), root / "model", progress=False)
    finally:
        WALK.on = False
    return WALK


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        walk = measure(Path(tmp))
    if args.json:
        print(json.dumps({"files": len(walk.reads), "hops": walk.hops(), "reads": dict(walk.reads.most_common())}))
        return
    for name, count in walk.reads.most_common():
        print(f"{count:6d}  {name}")
    print(f"{len(walk.reads)} files read the configuration; {walk.hops()} hops between them")


if __name__ == "__main__":
    main()
