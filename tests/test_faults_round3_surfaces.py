"""Issue 24, round 3 of bad input on the surfaces: the Python API's arguments, label templates, devices, texts
files, the hub's endpoint port, doctor, and a full disk while saving. Each case ends as the package's error naming
the input, before any work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from helpers import REPO, TINY_MODEL, TINY_TRAINING

from adapters.clip_finetune.api import encode, fit, get_model
from adapters.clip_finetune.api.run import Run
from adapters.clip_finetune.api.run_folder import RunError, create_run, update_state
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.errors import ConfigError, DataError
from adapters.clip_finetune.model.clip import load_model, save_artifact


@pytest.mark.parametrize("model", [None, 5, ""])
def test_fit_names_a_model_that_is_not_one(tmp_path: Path, model: object) -> None:
    with pytest.raises(ConfigError, match="^model: expected an open_clip architecture name"):
        fit(model, [("a.png", "a cat")], runs_dir=tmp_path / "runs")  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()  # before any work: no run folder


def test_fit_without_train_data_is_refused_before_a_run_starts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="^train_data: required"):
        fit(str(TINY_MODEL), None, runs_dir=tmp_path / "runs")  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    folder = save_artifact(load_model(cfg), tmp_path_factory.mktemp("model") / "model", cfg)
    return get_model(folder, "clip-text")


@pytest.mark.parametrize("data", [None, 5, b"bytes"])
def test_encode_names_data_that_is_not_texts_or_images(text_encoder, data: object) -> None:
    with pytest.raises(DataError, match="^encode: data must be a text, an image"):
        encode(text_encoder, data)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "8"])
def test_encode_refuses_a_batch_size_below_one(text_encoder, batch_size: object) -> None:
    with pytest.raises(ConfigError, match="^encode: batch_size must be a whole number of at least 1"):
        encode(text_encoder, ["a cat"], batch_size=batch_size)  # type: ignore[arg-type]
    assert encode(text_encoder, ["a cat", "a dog"], batch_size=1).shape == (2, text_encoder.embed_dim)


@pytest.mark.parametrize("artifact", [None, 5, ""])
def test_get_model_names_an_artifact_that_is_not_one(artifact: object) -> None:
    with pytest.raises(ConfigError, match="^artifact: expected a saved model folder or a finished Run"):
        get_model(artifact, "clip-text")  # type: ignore[arg-type]


def test_save_artifact_onto_its_own_folder_is_refused(tmp_path: Path) -> None:
    run_dir = create_run(tmp_path / "runs", "done", {"config": {}})
    update_state(run_dir, status="finished")
    (run_dir / "model").mkdir()
    (run_dir / "model" / "weights").write_text("w")
    for target in (run_dir / "model", run_dir / "model" / "copy", run_dir, tmp_path / "runs"):
        with pytest.raises(RunError, match="the run's own model folder, inside it or a folder holding it"):
            Run(run_dir).save_artifact(target, overwrite=True)
    assert sorted(p.name for p in (run_dir / "model").iterdir()) == ["weights"]  # nothing copied into itself
    assert (Run(run_dir).save_artifact(tmp_path / "elsewhere") / "weights").read_text() == "w"


@pytest.mark.parametrize("template", ["{label:>9999999999}", "{label.__class__}", "{label!r}", "{label[0]}", "{0}",
                                      "{}", "a {label:{label}}"])
def test_a_label_template_holds_only_a_bare_label_and_is_never_formatted_to_check(template: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="may only hold {label}, with no format, attribute or index"):
        build_config({"label_templates": [template]})
    assert time.monotonic() - started < 2  # '{label:>9999999999}' formatted would build a 10 GB string
    assert build_config({"label_templates": ["a photo of {label}", "{{literal}} {label}"]})


def test_embed_texts_of_blank_lines_is_an_error_not_an_empty_index(tmp_path: Path, capsys) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n   \n\t\n")
    out = tmp_path / "vectors.npz"
    assert main(["embed", "--texts", str(texts), "--out", str(out), "--set", f"model_name={TINY_MODEL}",
                 "--set", "pretrained=none"]) == 2
    assert f"--texts {str(texts)!r}: nothing to embed (no line holds text)" in capsys.readouterr().err
    assert not out.exists()


def test_the_hub_check_probes_the_port_of_hf_endpoint(monkeypatch) -> None:
    import socket

    from huggingface_hub import constants as hf_constants

    from adapters.clip_finetune.model import hub

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with listener:
        source = hub.WeightsSource("hf-hub:org/model", "127.0.0.1", None, hub._port(urlparse(f"http://127.0.0.1:{port}")))
        assert source.port == port and hub.download_blocked(source) is None  # the mirror's port answers
    closed = hub.WeightsSource("hf-hub:org/model", "127.0.0.1", None, port)
    assert hub.download_blocked(closed) == f"127.0.0.1:{port} cannot be reached from this machine"
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    load_model(build_config({"model_name": str(TINY_MODEL), "pretrained": None}))  # registers clip-tiny
    import open_clip.pretrained as open_clip_pretrained

    monkeypatch.setitem(open_clip_pretrained._PRETRAINED, "clip-tiny", {"mirror": {"hf_hub": "org/model/"}})
    assert hub.weights_source("clip-tiny", "mirror").port == port
    assert hub._port(urlparse("https://hub.example")) == 443 and hub._port(urlparse("http://hub.example")) == 80


@pytest.mark.parametrize(("setting", "problem"), [
    ("device=cuda:7", "device: 'cuda:7' is not available: this machine has no CUDA device"),
    ("device=meta", "device: 'meta' cannot run a model here"),
    ("device=mps", "device: 'mps' is not available on this machine"),
    ("pretrained=/etc/passwd", "local /etc/passwd: not a weights file (neither safetensors nor torch's format)"),
])
def test_doctor_reports_a_device_or_weights_that_cannot_work(setting: str, problem: str, capsys) -> None:
    args = ["doctor", "--set", f"model_name={TINY_MODEL}", "--set", "pretrained=none", "--set", setting]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("problem") and problem in line for line in out.splitlines()), out


def _broken_package(folder: Path, module: str, error: str) -> dict[str, str]:
    """A package `module` under `folder` that is installed but raises `error` on import; the environment that
    puts it first on the path."""
    (folder / module).mkdir()
    (folder / module / "__init__.py").write_text(f"raise {error}\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


@pytest.mark.parametrize(("module", "error"), [
    ("torch", 'OSError("libtorch_cpu.so: cannot open shared object file")'),
    ("open_clip", 'ImportError("cannot import name create_model")'),
])
def test_doctor_reports_a_package_that_cannot_import(module: str, error: str, tmp_path: Path) -> None:
    env = _broken_package(tmp_path, module, error)
    done = subprocess.run([sys.executable, "-m", "adapters.clip_finetune.cli.main", "doctor"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert re.search(rf"^problem +import {module} +fails: .*{error.split('(')[0]}", done.stdout, re.M), done.stdout


def test_doctor_reports_a_dtlpy_that_cannot_import(tmp_path: Path, monkeypatch, capsys) -> None:
    # doctor imports dtlpy in a process of its own (its import writes under $DATALOOP_PATH), which inherits the
    # environment: doctor itself runs here, where torch and open_clip import (a process start fewer)
    env = _broken_package(tmp_path, "dtlpy", 'RuntimeError("a broken dtlpy")')
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^problem +import dtlpy +fails: RuntimeError: a broken dtlpy; the Dataloop app needs it", out,
                     re.M), out
    assert not re.search(r"^problem +import (torch|open_clip)", out, re.M), out


def test_a_million_evaluation_pairs_are_refused_before_any_embedding() -> None:
    from adapters.clip_finetune.data.pairs import CaptionPair
    from adapters.clip_finetune.retrieval.evaluate import evaluate

    pairs = [CaptionPair(f"/nowhere/{i}.png", f"caption {i}") for i in range(1_000_000)]
    started = time.monotonic()
    with pytest.raises(DataError, match=r"the evaluation set of 1,000,000 pairs \(1,000,000 captions x 1,000,000 "
                                         r"images\) is too large.*Evaluate on a sample"):
        evaluate(None, pairs)  # type: ignore[arg-type]  (no model is touched: refused first)
    assert time.monotonic() - started < 30


def test_zero_shot_past_its_class_cap_is_skipped_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    from helpers import png_bytes

    from adapters.clip_finetune.data.pairs import CaptionPair
    from adapters.clip_finetune.retrieval import evaluate as evaluation

    pairs = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(colour))
        pairs.append(CaptionPair(str(tmp_path / f"{i}.png"), f"a photo of class {i}", label=f"class {i}"))
    clip = load_model(build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)}))
    assert any(k.startswith("zero_shot/") for k in evaluation.evaluate(clip, pairs, progress=False))
    monkeypatch.setattr(evaluation, "MAX_ZERO_SHOT_CLASSES", 3)
    scores = evaluation.evaluate(clip, pairs, progress=False)
    assert not any(k.startswith("zero_shot/") for k in scores) and "text_to_image/mrr" in scores
    assert "zero-shot accuracy skipped: 4 classes is more than 3" in caplog.text


def test_the_output_guard_covers_the_test_split(tmp_path: Path, capsys) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    out = tmp_path / "test" / "model"
    assert main(["train", "--data", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--out", str(out),
                 "--set", f"model_name={TINY_MODEL}", "--set", "pretrained=none"]) == 2
    assert f"would mix the model with the data {str(tmp_path / 'test')!r}" in capsys.readouterr().err
    assert not out.exists()


def test_search_prints_file_names_repr_safe(tmp_path: Path, capsys) -> None:
    from helpers import png_bytes

    images = tmp_path / "images"
    images.mkdir()
    forged = "a.png\n   1. 0.9999  forged.png"
    for name, colour in ((forged, (255, 0, 0)), ("\x1b[2Jclear.png", (0, 255, 0)), ("plain.png", (0, 0, 255))):
        (images / name).write_bytes(png_bytes(colour))
    model = ["--set", f"model_name={TINY_MODEL}", "--set", "pretrained=none"]
    assert main(["embed", "--images", str(images), "--out", str(tmp_path / "index.npz"), *model]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "index.npz"), "-k", "3", *model, "--", "a red square"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "a red square" and len(lines) == 4  # the query and exactly its 3 results
    assert "\x1b" not in out and "forged.png" in out and "\\n" in out
    assert any(line.endswith("plain.png") for line in lines)
