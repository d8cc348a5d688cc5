"""Cores come from the pod's CPU quota (a cgroup), not the affinity mask: a fake cgroup folder stands in for
/sys/fs/cgroup, and everything that sizes threads or worker processes follows it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
import torch
from helpers import REPO

from adapters.clip_finetune import machine
from adapters.clip_finetune.cli import main as cli_main
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.datasets import default_num_workers

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(folder: Path, v2: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    """A cgroup folder with a v2 `cpu.max` ("<quota> <period>" or "max <period>") or v1 quota/period files."""
    folder.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (folder / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (folder / "cpu").mkdir()
        (folder / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (folder / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return folder


@pytest.mark.parametrize(
    "v2,v1,limit",
    [
        ("150000 100000", None, 1.5),  # cgroup v2: 1.5 CPUs
        ("max 100000", None, None),  # v2 without a quota
        (None, (50000, 100000), 0.5),  # cgroup v1
        (None, (-1, 100000), None),  # v1 without a quota
        (None, None, None),  # nothing readable
    ],
)
def test_cgroup_cpu_limit_reads_v1_and_v2(tmp_path: Path, v2: str | None, v1: tuple[int, int] | None,
                                          limit: float | None) -> None:
    assert machine.cgroup_cpu_limit(cgroup(tmp_path / "cg", v2, v1)) == limit


def test_cpu_cores_is_the_quota_rounded_up_and_never_above_the_affinity(tmp_path: Path) -> None:
    assert machine.cpu_cores(cgroup(tmp_path / "a", "150000 100000")) == min(2, AFFINITY)
    assert machine.cpu_cores(cgroup(tmp_path / "b", "10000 100000")) == 1  # a tenth of a core still gets one
    assert machine.cpu_cores(cgroup(tmp_path / "c", f"{(AFFINITY + 8) * 100000} 100000")) == AFFINITY
    assert machine.cpu_cores(cgroup(tmp_path / "d", "max 100000")) == AFFINITY


@pytest.fixture
def one_cpu_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process seen as a pod limited to one CPU on a machine with many more cores."""
    monkeypatch.setattr(machine, "CGROUP_ROOT", cgroup(tmp_path / "pod", "100000 100000"))
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_cpu_pod")
def test_everything_that_sizes_threads_and_workers_follows_the_quota() -> None:
    assert machine.cpu_cores() == 1
    assert machine.decode_threads() == 1
    assert default_num_workers(None, torch.device("cpu")) == 0
    assert default_num_workers(None, torch.device("cuda")) == 0  # every core but one decodes: none here


@pytest.mark.usefixtures("one_cpu_pod")
def test_apply_config_caps_torch_threads_at_the_quota() -> None:
    torch.set_num_threads(4)  # what torch picks from the affinity mask on a many-core node
    machine.apply_config(build_config({"model_name": "ViT-B-32", "pretrained": None}))
    assert torch.get_num_threads() == 1


def test_exit_process_ends_with_the_code_after_the_atexit_handlers_with_the_heap_frozen(tmp_path: Path) -> None:
    # an atexit handler (as logging's flush or a tracker's) runs after the freeze and can still write its file
    child = ("import atexit, gc, pathlib, sys\n"
             "from adapters.clip_finetune.machine import exit_process\n"
             "atexit.register(lambda: pathlib.Path(sys.argv[1]).write_text(str(gc.get_freeze_count() > 0)))\n"
             "exit_process(3)\n")
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path / "flag")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3 and done.stderr == ""
    assert (tmp_path / "flag").read_text() == "True"


def test_the_command_line_ends_through_exit_process_with_mains_code(monkeypatch, capsys) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["clip-finetune"] == "adapters.clip_finetune.cli.main:run"
    assert "from .cli.main import run" in (REPO / "adapters" / "clip_finetune" / "__main__.py").read_text()
    ended: list[int] = []

    def recorded(code: int) -> None:
        ended.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(machine, "exit_process", recorded)  # in-process: the real one would freeze the test run
    monkeypatch.setattr("sys.argv", ["clip-finetune", "config", "--set", "bogus_key=1"])
    with pytest.raises(SystemExit):
        cli_main.run()
    assert ended == [2] and "bogus_key: unknown key" in capsys.readouterr().err
