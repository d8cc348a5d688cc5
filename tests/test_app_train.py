"""app.train assembles a training run once, whoever starts it: the sizes are checked and the configuration's
process-wide settings applied once per run, from the CLI, the Python API's worker, the demo and the Dataloop
adapter (counted by wrapping the two functions where the engine and the faces reach them)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, TINY_TRAINING, set_args
from loopback_platform import LoopbackPlatform, dtlpy_pointed_at, tag_subset_filter

from adapters.clip_finetune import machine
from adapters.clip_finetune.api import fit
from adapters.clip_finetune.cli.demo import run_demo
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.data.synthetic import render, sample_specs, write_csv
from adapters.clip_finetune.dataloop import adapter as adapter_module
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.training import fit as training_fit
from adapters.clip_finetune.training import optim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How often check_sizes and apply_config run, wherever they are called from."""
    counts: Counter = Counter()

    def counting(name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for module, name in ((training_fit, "check_sizes"), (optim, "check_sizes"), (training_fit, "apply_config"),
                         (machine, "apply_config"), (adapter_module, "apply_config")):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return counts


def test_cli_train_checks_sizes_and_applies_the_config_once(tmp_path, tiny_model_config, calls) -> None:
    table = write_csv(tmp_path / "pairs.csv", 48, seed=3)
    args = set_args({**TINY_TRAINING, "model_name": tiny_model_config, "num_epochs": 1})
    assert main(["train", "--data", str(table), "--out", str(tmp_path / "m"), *args]) == 0
    assert calls == {"check_sizes": 1, "apply_config": 1}


def test_api_fit_checks_sizes_and_applies_the_config_once(tmp_path, tiny_model_config, calls) -> None:
    table = write_csv(tmp_path / "pairs.csv", 48, seed=3)
    run = fit(tiny_model_config, str(table), wait=True, runs_dir=tmp_path / "runs",
              **{**TINY_TRAINING, "num_epochs": 1})
    assert run.status()["status"] == "finished"
    assert calls == {"check_sizes": 1, "apply_config": 1}


def test_demo_checks_sizes_and_applies_the_config_once(tmp_path, calls) -> None:
    res = run_demo(tmp_path / "demo", n_train=48, n_validation=16, overrides={"num_epochs": 1}, progress=False)
    assert res.result.history
    assert calls == {"check_sizes": 1, "apply_config": 1}


def test_platform_training_checks_sizes_and_applies_the_config_once(tmp_path, monkeypatch, calls) -> None:
    """The adapter applies its model's configuration when it loads the model (its embed and evaluate functions
    need the pixel limit too); training then does not apply it again."""
    monkeypatch.chdir(tmp_path)  # train_model downloads under ./tmp/<model id>/
    with LoopbackPlatform() as platform, dtlpy_pointed_at(platform):
        project = platform.add_project()
        dataset = platform.add_dataset(project["id"], "photos")
        for i, spec in enumerate(sample_specs(24, seed=5)):
            path = tmp_path / f"{i:02d}.png"
            render(spec, size=64).save(path)
            platform.add_item(dataset["id"], path, f"/photos/{path.name}", description=spec.captions[0],
                              tags=["train" if i < 16 else "validation"])
        model = platform.add_model(project["id"], "tiny", QUICK_CONFIG, dataset["id"],
                                   subsets={s: tag_subset_filter(s) for s in ("train", "validation")})
        ClipAdapter().train_model(dl.models.get(model_id=model["id"]))
        assert platform.artifact_files(model["id"])  # the trained weights reached the platform
    assert calls == {"check_sizes": 1, "apply_config": 1}


def test_the_app_layer_is_what_the_faces_call_to_train() -> None:
    """No face calls training.finetune itself: they go through app.train (the one place a run is assembled)."""
    faces = Path(__file__).resolve().parents[1] / "adapters" / "clip_finetune"
    callers = [p.relative_to(faces).as_posix() for folder in ("cli", "api", "dataloop")
               for p in (faces / folder).rglob("*.py") if "finetune(" in p.read_text()]
    assert callers == []
