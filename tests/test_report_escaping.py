"""`clip-finetune report` on run folders someone else made: every value escaped, only the run's own pictures
inlined (others refused and said so), and six shapes of damage reported instead of a traceback. `runs list`
survives a run whose state lacks fields; `search` prints names repr-safe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes

from adapters.clip_finetune.api.run import Run
from adapters.clip_finetune.api.run_folder import RunError, create_run, update_state
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.cli.runs import printable
from adapters.clip_finetune.errors import DataError

SCRIPT = "<script>alert(1)</script>"


def _finished_run(root: Path, name: str = "planted") -> Path:
    run_dir = create_run(root, name, {"config": {}, "train_data": None, "eval_data": None, "test_data": None})
    update_state(run_dir, status="finished")
    return run_dir


def _examples(run_dir: Path, images: list[str], owner: list[int], relevant: list[list[int]] | None = None) -> None:
    folder = run_dir / "examples"
    folder.mkdir(exist_ok=True)
    # one-hot images; each caption points away from its image before and at it after: every caption "improved"
    image_features = np.eye(max(len(images), 8), dtype=np.float32)[: len(images)]
    owned = np.eye(max(len(images), 8), dtype=np.float32)[[min(o, len(images) - 1) for o in owner]]
    for when, sign in (("before", -1), ("after", 1)):
        arrays = {"images": np.asarray(images, dtype=str), "captions": np.asarray([SCRIPT] * len(owner), dtype=str),
                  "image_features": image_features, "text_features": sign * owned,
                  "text_to_image": np.asarray(owner, dtype=np.int64)}
        if relevant is not None:
            arrays["relevant"] = np.asarray(relevant, dtype=np.int64)
        np.savez(folder / f"{when}.npz", **arrays)


def test_every_value_of_a_planted_run_is_escaped(tmp_path: Path) -> None:
    run_dir = _finished_run(tmp_path / "runs")
    (run_dir / "data_report.json").write_text(json.dumps({
        "train": {"used": SCRIPT, "skipped": {SCRIPT: 3}, "examples": {SCRIPT: [SCRIPT]}}}))
    (run_dir / "result.json").write_text(json.dumps({
        "best_epoch": SCRIPT, "metric": SCRIPT, "note": SCRIPT, "before": {"text_to_image/recall@1": SCRIPT},
        "after": {"text_to_image/recall@1": 0.5}}))
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "<script" not in page and "&lt;script&gt;" in page


def test_only_the_runs_own_pictures_are_inlined_the_rest_refused_and_named(tmp_path: Path) -> None:
    secret = tmp_path / "home" / "private.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes((255, 0, 0)))
    run_dir = _finished_run(tmp_path / "runs")
    (run_dir / "data").mkdir()
    own = run_dir / "data" / "own.png"
    own.write_bytes(png_bytes((0, 255, 0)))
    link = run_dir / "data" / "link.png"  # inside the run by name, outside it in fact
    link.symlink_to(secret)
    others = []
    for i in range(6):
        others.append(run_dir / "data" / f"other{i}.png")
        others[-1].write_bytes(png_bytes((0, 200, 0)))
    _examples(run_dir, [str(own), str(secret), str(link), *map(str, others)], [0, 1, 2])
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "pictures not shown: they lie outside the run folder" in page and str(secret) in page
    assert page.count("src='data:image/jpeg") >= 1  # the run's own picture still shows
    import base64
    import io
    import re

    from PIL import Image

    shown = [Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB").getpixel((0, 0))
             for uri in re.findall(r"src='data:image/jpeg;base64,([^']*)'", page)]
    assert shown and all(pixel[0] < 60 for pixel in shown)  # never the red private picture


@pytest.mark.parametrize("damage", [
    ("result.json", "[1, 2, 3]", "is not a JSON object"),
    ("result.json", json.dumps({"history": [{"epoch": "x"}], "before": [1], "after": "x"}), "Fine-tuning report"),
    ("result.json", json.dumps({"history": [{"epoch": 1, "train_loss": 1.0, "lr": 0.1, "text_to_image/recall@1": 0.5},
                                            {"epoch": 2, "train_loss": 0.5, "lr": 0.1, "text_to_image/recall@1": "x"}],
                                "before": {"text_to_image/mrr": None}}), "Training curves"),
    ("data_report.json", json.dumps({"train": [1], "validation": {"skipped": [1, 2], "examples": 3}}), "Data"),
    ("data_report.json", json.dumps({"train": {"skipped": {"bad": "many"}, "examples": {"bad": "x"}}}), "Data"),
    ("state.json", json.dumps({"status": "finished", "created_at": "x"}), "No metrics yet"),
])
def test_six_shapes_of_damage_end_as_a_report_or_one_message(tmp_path: Path, capsys, damage) -> None:
    name, text, expected = damage
    run_dir = _finished_run(tmp_path / "runs")
    (run_dir / name).write_text(text)
    code = main(["report", str(run_dir)])
    out = capsys.readouterr()
    if expected == "is not a JSON object":
        assert code == 2 and expected in out.err and name in out.err
    else:
        assert code == 0 and expected in (run_dir / "report.html").read_text()


@pytest.mark.parametrize("case", ["out of range", "relevant out of range", "truncated", "not a zip"])
def test_damaged_example_files_leave_the_rest_of_the_report(tmp_path: Path, case: str) -> None:
    run_dir = _finished_run(tmp_path / "runs")
    (run_dir / "result.json").write_text(json.dumps({"before": {"text_to_image/mrr": 0.1},
                                                     "after": {"text_to_image/mrr": 0.2}}))
    if case == "out of range":
        _examples(run_dir, ["a.png"], [0, 7])
    elif case == "relevant out of range":
        _examples(run_dir, ["a.png"], [0], relevant=[[0, 0], [3, 9]])
    else:
        _examples(run_dir, ["a.png"], [0])
        after = run_dir / "examples" / "after.npz"
        after.write_bytes(after.read_bytes()[:200] if case == "truncated" else b"not a zip at all")
    with pytest.raises((RunError, DataError), match="damaged|not a readable .npz"):
        Run(run_dir).example_results()
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "No examples:" in page and "Retrieval metrics" in page


def test_runs_list_shows_a_run_whose_state_lacks_fields(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    _finished_run(root, "whole")
    odd = _finished_run(root, "odd")
    (odd / "state.json").write_text(json.dumps({"status": "started", "created_at": "2026", "pid": 2 ** 22 + 7,
                                                "progress": {"epoch": 1}, "name": "odd\x1b[2J"}))
    assert main(["runs", "list", "--runs-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "whole" in out and "odd" in out and "\x1b" not in out and "worker died" in out


def test_names_print_repr_safe() -> None:
    assert printable("cat.png") == "cat.png"
    forged = printable("a.png\n  1. 0.9999  forged.png")
    assert "\n" not in forged and "\\n" in forged
    assert "\x1b" not in printable("\x1b[31mred.png")
