"""The Python API: a background run followed from a fresh process, failures, reconnecting, get_model/encode.

One background run (96 training pairs by path, 3 epochs of the tiny model) is shared by the module; the
quick tests run while it trains. It evaluates on 32 of its training pairs, given as PIL images: 18 steps
of the tiny model do not lift held-out retrieval reliably, but they do lift it on seen pairs, which is
what the before/after plumbing needs (held-out gains are test_train.py's job).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_TRAINING
from PIL import Image

from adapters.clip_finetune.api import encode, fit, get_model, get_run, list_runs
from adapters.clip_finetune.api.run_folder import RUNS_DIR_ENV, WORKER_DIED
from adapters.clip_finetune.cli.main import main as cli_main
from adapters.clip_finetune.cli.runs import add_runs_parser, cmd_runs
from adapters.clip_finetune.data.load import load_dataset
from adapters.clip_finetune.data.synthetic import write_dataloop_download
from adapters.clip_finetune.errors import ConfigError, DataError
from adapters.clip_finetune.model.clip import load_artifact
from adapters.clip_finetune.retrieval.store import load_embeddings

# From-scratch training of the tiny model: a learning rate far above the fine-tuning default.
TINY = {**TINY_TRAINING, "learning_rate": 2e-3, "num_epochs": 3, "early_stopping": False}
DIRECTIONS = ("text_to_image", "image_to_text")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataloop_download(tmp_path_factory.mktemp("data"), 96, 32, seed=1)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def background(data, runs_dir, tiny_model_config):
    """The shared run: training data by path, evaluation data as in-memory (PIL image, caption) pairs."""
    train, _ = load_dataset(data / "train")
    eval_pairs = [(Image.open(p.image), p.caption) for p in train["train"][:32]]
    t0 = time.monotonic()
    # evaluating on training pairs on purpose (see the module docstring): keep them, though they are also in train
    run = fit(model=tiny_model_config, train_data=data / "train", eval_data=eval_pairs, run_name="shared",
              runs_dir=runs_dir, **TINY, drop_train_overlap=False)
    return run, time.monotonic() - t0, run.status()["status"]


@pytest.fixture(scope="module")
def finished(background):
    run = background[0]
    assert run.wait(timeout=300)["status"] == "finished", run.logs()
    return run


def test_fit_returns_at_once_with_the_run_created_or_started(background) -> None:
    run, seconds, status = background
    assert seconds < 10 and status in ("created", "started")
    assert run.name == "shared" and run.config["num_epochs"] == 3
    # the PIL images were written into the run folder for the worker to read
    assert len(list((run.path / "data" / "eval").glob("*.png"))) == 32


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"num_epoch": 3}, r"num_epoch: unknown key; did you mean 'num_epochs'\?"),
     ({"learning_rate": -1}, r"learning_rate: .*greater than 0")],
    ids=["typo", "out-of-range"],
)
def test_a_bad_hyperparameter_fails_before_any_run_folder_exists(tmp_path, data, tiny_model_config, bad,
                                                                 message) -> None:
    with pytest.raises(ConfigError, match=message):
        fit(model=tiny_model_config, train_data=data, runs_dir=tmp_path / "runs", **{**TINY, **bad})
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("wait", [False, True], ids=["background", "foreground"])
def test_a_bad_data_path_fails_the_run_with_the_reason(wait, runs_dir, tmp_path, tiny_model_config) -> None:
    missing = tmp_path / "no-such-data"
    name = f"bad-data-{'fg' if wait else 'bg'}"
    if wait:
        with pytest.raises(DataError, match="does not exist"):
            fit(model=tiny_model_config, train_data=missing, run_name=name, runs_dir=runs_dir, wait=True, **TINY)
        run = get_run(name, runs_dir)
    else:
        run = fit(model=tiny_model_config, train_data=missing, run_name=name, runs_dir=runs_dir, **TINY)
    state = run.wait(timeout=120)
    assert state["status"] == "failed"
    assert str(missing) in state["details"] and "does not exist" in state["details"]
    assert "does not exist" in run.logs()
    with pytest.raises(Exception, match="failed"):
        run.metrics()


def test_a_killed_worker_is_reported_failed_worker_died(runs_dir, data, tiny_model_config) -> None:
    val, _ = load_dataset(data / "validation")
    pairs = [(p.image, p.caption) for p in val["train"]]  # a list of (path, caption) pairs
    run = fit(model=tiny_model_config, train_data=pairs, run_name="killed", runs_dir=runs_dir, **TINY)
    deadline = time.monotonic() + 60
    while (state := run.status())["status"] == "created" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["status"] == "started" and state["pid"], state
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(0.5)
    # a fresh handle has no Popen to reap the child: the zombie itself must count as dead
    reconnected = get_run("killed", runs_dir).status()
    assert reconnected["status"] == "failed" and reconnected["error"] == WORKER_DIED
    assert WORKER_DIED in reconnected["details"] and str(state["pid"]) in reconnected["details"]
    assert run.status()["status"] == "failed"


def test_a_fresh_process_reconnects_streams_the_logs_and_reads_the_metrics(background, runs_dir) -> None:
    run = background[0]
    child = (
        "import json; from adapters.clip_finetune import api\n"
        "run = api.get_run('shared')\n"  # found through $CLIP_FINETUNE_RUNS_DIR
        "lines = list(run.stream_logs(poll_interval=0.1))\n"
        "print(json.dumps({'status': run.status(), 'metrics': run.metrics(), 'lines': lines}))\n"
    )
    env = {**os.environ, RUNS_DIR_ENV: str(runs_dir)}
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    # meanwhile: state.json is replaced whole, so every read of it parses
    seen = set()
    while proc.poll() is None:
        seen.add(json.loads((run.path / "state.json").read_text())["status"])
        time.sleep(0.02)
    out = json.loads(proc.stdout.read().strip().splitlines()[-1])
    assert proc.returncode == 0
    assert out["status"]["status"] == "finished" and out["status"]["progress"] == {"epoch": 3, "num_epochs": 3}
    assert seen <= {"created", "started", "finished"} and "finished" in seen
    assert any("epoch 3:" in line for line in out["lines"]) and "run shared finished" in out["lines"][-1]
    metrics = out["metrics"]
    for when in ("before", "after"):
        for d in DIRECTIONS:
            assert 0 <= metrics[when][f"{d}/recall@1"] <= 1 and metrics[when][f"{d}/mrr"] > 0
    assert metrics["best_epoch"] >= 1 and len(metrics["history"]) == 3
    assert out["status"]["improved"] is True and metrics["note"] == ""  # an epoch beat the base: nothing to say
    assert list(run.path.rglob("*.tmp")) == []


def test_save_artifact_writes_a_model_folder_that_loads(finished, tmp_path) -> None:
    out = finished.save_artifact(tmp_path / "model")
    names = {p.name for p in out.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "metrics.json"} <= names
    assert "checkpoint.pt" not in names  # training state, deleted when the run finished
    clip = load_artifact(out)
    assert clip.embed_dim == 64
    assert json.loads((out / "metrics.json").read_text())["after"] == finished.metrics()["after"]


def test_example_results_hit_the_right_image_more_often_after_training(finished) -> None:
    examples = finished.example_results(k=5)
    assert len(examples) == 32 and all(len(e.before) == len(e.after) == 5 for e in examples)
    assert all(e.after[0][1] >= e.after[-1][1] for e in examples)  # best first
    hits_before, hits_after = sum(e.hit_before for e in examples), sum(e.hit_after for e in examples)
    assert hits_after > hits_before, (hits_before, hits_after)
    # the counts agree with the run's own hit@5
    assert hits_after / 32 == pytest.approx(finished.metrics()["after"]["text_to_image/hit@5"])


def test_get_model_and_encode_give_the_cli_embed_vectors(finished, tmp_path, capsys) -> None:
    images = sorted(str(p) for p in (finished.path / "data" / "eval").glob("*.png"))[:12]
    folder = tmp_path / "images"
    folder.mkdir()
    for p in images:
        (folder / Path(p).name).symlink_to(p)
    texts = ["a red circle on the left", "a big blue square at the top", "green ring, middle"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    model = str(finished.model_dir)
    assert cli_main(["embed", "--model", model, "--images", str(folder), "--out", str(tmp_path / "i.npz")]) == 0
    assert cli_main(["embed", "--model", model, "--texts", str(tmp_path / "texts.txt"),
                     "--out", str(tmp_path / "t.npz")]) == 0
    image_ids, image_vectors = load_embeddings(tmp_path / "i.npz")
    _, text_vectors = load_embeddings(tmp_path / "t.npz")

    vision, text = get_model(finished, select_model="clip-vision"), get_model(model, select_model="clip-text")
    from_paths = encode(vision, image_ids, batch_size=5)
    from_pil = encode(vision, [Image.open(p) for p in image_ids])
    from_texts = encode(text, texts)
    for got, want in ((from_paths, image_vectors), (from_pil, image_vectors), (from_texts, text_vectors)):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    mixed = encode(vision, [image_ids[0], Image.open(image_ids[1]), image_ids[2]])  # rows stay in order
    np.testing.assert_allclose(mixed, image_vectors[:3], atol=1e-5)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="1 of 2 images could not be decoded"):
        encode(vision, [image_ids[0], tmp_path / "broken.png"])
    with pytest.raises(ConfigError, match="select_model"):
        get_model(model, select_model="clip")


def test_list_runs_and_the_runs_cli_show_every_run(finished, runs_dir, capsys) -> None:
    names = [r.name for r in list_runs(runs_dir)]
    assert {"shared", "killed", "bad-data-bg", "bad-data-fg"} <= set(names)
    parser = argparse.ArgumentParser()
    add_runs_parser(parser.add_subparsers(dest="command"))
    capsys.readouterr()
    assert cmd_runs(parser.parse_args(["runs", "--runs-dir", str(runs_dir), "list"])) == 0
    table = capsys.readouterr().out
    assert "shared" in table and "finished" in table and "3/3" in table and WORKER_DIED in table
    assert cmd_runs(parser.parse_args(["runs", "--runs-dir", str(runs_dir), "status", "shared"])) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "finished"
    assert cmd_runs(parser.parse_args(["runs", "--runs-dir", str(runs_dir), "logs", "shared"])) == 0
    assert "run shared finished" in capsys.readouterr().out
