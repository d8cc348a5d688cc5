"""`clip-finetune push`: a saved model reaches a Hub repository (a stand-in of the Hub's HTTP API on 127.0.0.1,
driven by huggingface_hub's own client), with its card and weights byte for byte and its checkpoint left local;
no token, a bad repo id and a refused token are one clear error each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TINY_MODEL
from hub_standin import HubStandIn

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import FinetuneConfig
from adapters.clip_finetune.model.clip import load_model, save_artifact

TOKEN = "hf_standin_token"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    import huggingface_hub.constants

    stand_in = HubStandIn(TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks LFS, not Xet
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield stand_in
    stand_in.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    cfg = FinetuneConfig(model_name=str(TINY_MODEL), pretrained=None)
    out = save_artifact(load_model(cfg, "cpu"), tmp_path / "model", cfg, {"before": {}, "after": {}})
    (out / "checkpoint.pt").write_bytes(b"training state")
    return out


def test_push_uploads_the_model_card_and_weights_and_keeps_the_checkpoint_local(
        hub: HubStandIn, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["push", str(model_dir), "me/clip-tuned", "--private"]) == 0
    files = hub.repos["me/clip-tuned"]
    weights = "open_clip_model.safetensors"
    assert files[weights] == (model_dir / weights).read_bytes()
    assert (model_dir / weights).stat().st_size > 1_000_000  # big enough to matter
    assert files["README.md"].decode().startswith("---\nlibrary_name: open_clip")
    assert {"open_clip_config.json", "finetune_config.json", "metrics.json"} <= set(files)
    assert "checkpoint.pt" not in files and hub.private["me/clip-tuned"]
    assert "pushed" in capsys.readouterr().out
    # the weights went through LFS, as the Hub takes binary files
    assert (model_dir / weights).read_bytes() in hub.lfs.values()


def test_a_second_push_to_the_same_repository_updates_it(hub: HubStandIn, model_dir: Path) -> None:
    assert main(["push", str(model_dir), "me/clip-tuned"]) == 0
    (model_dir / "metrics.json").write_text('{"before": {}, "after": {"text_to_image/mrr": 0.5}}')
    assert main(["push", str(model_dir), "me/clip-tuned"]) == 0
    assert b"0.5" in hub.repos["me/clip-tuned"]["metrics.json"]


@pytest.mark.parametrize(("env", "repo", "message"), [
    ({"HF_TOKEN": ""}, "me/clip", "no Hugging Face token: set HF_TOKEN"),
    ({}, "me/../etc", "is not a Hub repository id"),
    ({"HF_TOKEN": "hf_wrong"}, "me/clip", "HTTP 401"),
])
def test_a_push_that_cannot_happen_is_one_clear_error(hub: HubStandIn, model_dir: Path, env: dict, repo: str,
                                                      message: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", str(model_dir.parent / "hf-home"))  # no token stored by `hf auth login`
    assert main(["push", str(model_dir), repo]) == 2
    assert message in capsys.readouterr().err
    assert not hub.repos


def test_a_folder_that_is_not_a_saved_model_is_refused(hub: HubStandIn, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert main(["push", str(tmp_path), "me/clip"]) == 2
    assert "is not a saved model folder" in capsys.readouterr().err
