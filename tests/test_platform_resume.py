"""A train_model interrupted after epoch 2 (a preempted service) is re-run on the same model: it resumes from
the checkpoint uploaded while it ran, does not redo the finished epochs, and ends with the weights of an
uninterrupted run; the finished run's checkpoint does not stay among the artifacts."""

from __future__ import annotations

import io
from pathlib import Path

import dtlpy as dl
import pytest
import safetensors.torch
import torch
from helpers import TINY_MODEL, TINY_TRAINING, add_model, published, seed_shapes
from loopback_platform import LoopbackPlatform, dtlpy_pointed_at

from adapters.clip_finetune.dataloop import adapter as adapter_module
from adapters.clip_finetune.dataloop.adapter import ClipAdapter

CONFIG = {"model_name": str(TINY_MODEL), **TINY_TRAINING, "learning_rate": 2e-3, "num_epochs": 3,
          "early_stopping": False}
WEIGHTS = "open_clip_model.safetensors"


class Preempted(Exception):
    """Stands in for the service going away mid-run."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(platform: LoopbackPlatform, model_id: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(platform.artifact_files(model_id)[WEIGHTS])


@pytest.mark.slow
def test_a_rerun_resumes_the_interrupted_run_and_matches_an_uninterrupted_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with LoopbackPlatform() as platform, dtlpy_pointed_at(platform):
        shapes = seed_shapes(platform, {"train": 64, "validation": 32})
        whole, broken = add_model(platform, shapes, CONFIG), add_model(platform, shapes, CONFIG)
        torch.manual_seed(0)
        ClipAdapter().train_model(whole)

        real_publish = adapter_module.publish

        def preempt_after_epoch_2(model, samples, dataset_id=None):
            real_publish(model, samples, dataset_id)
            if any(s.figure == "loss" and s.x == 2 for s in samples):
                raise Preempted

        monkeypatch.setattr(adapter_module, "publish", preempt_after_epoch_2)
        torch.manual_seed(0)
        with pytest.raises(Preempted):
            ClipAdapter().train_model(broken)
        assert platform.model(broken.id)["status"] != "trained"
        assert "checkpoint.pt" in platform.artifact_files(broken.id)  # uploaded while the run went on
        state = torch.load(io.BytesIO(platform.artifact_files(broken.id)["checkpoint.pt"]), weights_only=True)
        assert state["progress"]["epoch"] == 3  # epochs 1 and 2 are done

        monkeypatch.setattr(adapter_module, "publish", real_publish)
        torch.manual_seed(123)  # a restarted service: other random state, resumed from the checkpoint
        ClipAdapter().train_model(dl.models.get(model_id=broken.id))

        assert platform.model(broken.id)["status"] == "trained"
        assert "checkpoint.pt" not in platform.artifact_files(broken.id)
        losses = published(platform, broken.id, "loss")["train"]
        assert sorted(losses) == [1, 2, 3]  # the re-run published epoch 3 only: epochs 1-2 were not redone
        assert [s["data"]["x"] for s in platform.metrics(broken.id) if s["figure"] == "loss"].count(1) == 1
        a, b = _weights(platform, whole.id), _weights(platform, broken.id)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
