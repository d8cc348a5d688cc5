"""The bounded readers one by one (files that are not files, caps, nesting, encodings, captions cut before
tokenizing), what a run folder knows (fingerprint, lock, what it holds), embeddings that record their maker, and
the boundaries of the Python API and the Dataloop adapter. The command line's corpus is test_bad_input.py."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import open_clip
import pytest
from helpers import TINY_MODEL, TINY_TRAINING, deadline, png_bytes

from adapters.clip_finetune import encode, fit, get_model, get_run, list_runs
from adapters.clip_finetune.api.run import Run
from adapters.clip_finetune.api.run_folder import RunError, create_run, update_state
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data import safe_read
from adapters.clip_finetune.data.datasets import PairDataset
from adapters.clip_finetune.data.pairs import CaptionPair, DataReport
from adapters.clip_finetune.data.tables import read_table
from adapters.clip_finetune.errors import ConfigError, DataError, InputError, ModelError, user_error
from adapters.clip_finetune.inputs import (
    Unreadable,
    cap_captions,
    caption_chars,
    file_problem,
    parse_json,
    read_bytes,
    read_json,
)
from adapters.clip_finetune.model.clip import load_model, save_artifact
from adapters.clip_finetune.training.guard import (
    RunFolderError,
    check_output_folder,
    identity_differences,
    run_identity,
    writer_lock,
)


# ------------------------------------------------------------------------------------------ files, caps, JSON
def test_a_file_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    (tmp_path / "ok").write_text("x")
    kinds = {name: (file_problem(path) or ("ok",))[0] for name, path in {
        "fifo": tmp_path / "fifo", "zero": "/dev/zero", "folder": tmp_path, "loop": tmp_path / "a",
        "missing": tmp_path / "missing", "long": tmp_path / ("n" * 5000), "nul": "a\0b", "ok": tmp_path / "ok"}.items()}
    assert kinds == {"fifo": "not a regular file", "zero": "not a regular file", "folder": "a folder",
                     "loop": "symlink loop", "missing": "missing", "long": "unusable name", "nul": "unusable name",
                     "ok": "ok"}
    with deadline(60, "reading a FIFO"), pytest.raises(Unreadable, match="is a FIFO"):  # refused unopened
        read_bytes(tmp_path / "fifo", 100)


def test_reading_stops_at_the_cap(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 11)
    with pytest.raises(Unreadable, match="larger than 10 bytes"):
        read_bytes(tmp_path / "f", 10)
    assert read_bytes(tmp_path / "f", 11) == b"x" * 11


def test_json_nesting_is_capped_without_recursion_errors(tmp_path: Path) -> None:
    assert parse_json("[" * 100 + "]" * 100, "x") == parse_json("[" * 100 + "]" * 100, "x")  # 100 levels: read
    for depth in (101, 100_000):
        with pytest.raises(Unreadable, match="nested deeper than 100 levels"):
            parse_json("[" * depth + "]" * depth, "x")
    (tmp_path / "utf16.json").write_bytes('{"a": "é"}'.encode("utf-16"))
    assert read_json(tmp_path / "utf16.json") == {"a": "é"}
    (tmp_path / "cp1251.json").write_bytes('{"a": "красный круг слева"}'.encode("cp1251"))
    with pytest.raises(Unreadable, match=r"not UTF-8 text \(byte 0xea in line 1; it looks like cp1251"):
        read_json(tmp_path / "cp1251.json")


# --------------------------------------------------------------------------------------------------- tables
@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(png_bytes((i * 80, 0, 0)))
    return paths


def _table(tmp_path: Path, name: str, lines: list[str], encoding: str = "utf-8") -> tuple[list, DataReport]:
    (tmp_path / name).write_bytes("\n".join(lines).encode(encoding))
    report = DataReport()
    return read_table(tmp_path / name, report), report


def test_a_utf16_table_with_a_byte_order_mark_reads_like_utf8(tmp_path: Path, images: list[Path]) -> None:
    lines = ["filepath,caption", *(f"{p},un café numéro {i}" for i, p in enumerate(images))]
    assert _table(tmp_path, "a.csv", lines, "utf-16")[0] == _table(tmp_path, "b.csv", lines)[0]
    assert [p.caption for p in _table(tmp_path, "b.csv", lines)[0]][0] == "un café numéro 0"


def test_a_damaged_row_of_a_utf8_table_is_skipped_and_counted(tmp_path: Path, images: list[Path]) -> None:
    raw = b"filepath,caption\n" + f"{images[0]},caf\u00e9\n".encode() + f"{images[1]},caf".encode() + b"\xe9\n" + \
        f"{images[2]},ok\n".encode()
    (tmp_path / "mixed.csv").write_bytes(raw)
    report = DataReport()
    pairs = read_table(tmp_path / "mixed.csv", report)
    assert [p.caption for p in pairs] == ["café", "ok"] and dict(report.skipped) == {"not UTF-8 text": 1}


def test_long_fields_long_lines_and_deep_lines_are_skipped_one_row_each(
        tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safe_read, "MAX_LINE_CHARS", 300_000)
    huge, long_caption = "x" * 300_001, "y" * 200_000  # the second is over csv's own 131,072 limit: still read
    pairs, report = _table(tmp_path, "t.csv", ["filepath,caption", f"{images[0]},{huge}", f"{images[1]},{long_caption}",
                                               f"{images[2]},fine"])
    assert [p.caption for p in pairs] == [long_caption, "fine"] and dict(report.skipped) == {"unreadable row": 1}
    lines = [json.dumps({"image": str(images[0]), "caption": huge}), "[" * 1000 + "]" * 1000, "[1, 2]",
             json.dumps({"image": str(images[1]), "caption": {"nested": "object"}}),
             json.dumps({"image": str(images[2]), "caption": "fine"})]
    pairs, report = _table(tmp_path, "t.jsonl", lines)
    assert [p.caption for p in pairs] == ["fine"]
    assert dict(report.skipped) == {"line too long": 1, "unreadable json line (nested too deeply)": 1,
                                    "unreadable json line": 1, "caption or image path is not text": 1}


def test_image_paths_that_are_not_images_are_skipped_for_their_reason(tmp_path: Path, images: list[Path]) -> None:
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    with deadline(60, "a table naming a FIFO"):
        pairs, report = _table(tmp_path, "t.csv", ["filepath,caption", f"{tmp_path / 'fifo.png'},a", "/dev/zero,b",
                                                   f"{tmp_path / 'loop.png'},c", f"{tmp_path},d", f"{images[0]},e"])
    assert [p.caption for p in pairs] == ["e"]
    assert dict(report.skipped) == {"image file is not a regular file": 2, "image file is a symlink loop": 1,
                                    "image file is a folder": 1}


# ------------------------------------------------------------------------------------------------- captions
def test_captions_are_cut_before_tokenizing_to_a_documented_length() -> None:
    assert (caption_chars(77), caption_chars(512), caption_chars(None), caption_chars(16)) == (1232, 8192, 1232, 1024)
    short, spaced = "a red circle  on the left", "a " + " " * 5000 + "b " * 1000
    assert cap_captions([short], 77) == [short]  # under the cap: untouched, byte for byte
    assert cap_captions([spaced], 77) == [("a " + "b " * 1000)[:1232]]
    assert cap_captions(["a \ud800 b"], 77) == ["a ? b"]  # a lone surrogate: no tokenizer encodes it


def test_the_training_tokens_are_those_of_the_cut_caption() -> None:
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    word = "".join(chr(97 + (i * 7919) % 26) for i in range(20_000))  # open_clip's BPE on it in full: seconds
    dataset = PairDataset([CaptionPair("unused.png", word)], lambda im: im, tokenizer)
    assert dataset.tokens.equal(tokenizer([word[:1232]]))


# ------------------------------------------------------------------------------------------ run folders
def test_a_checkpoints_fingerprint_names_what_differs(tmp_path: Path) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    from adapters.clip_finetune.data.load import Splits

    image = tmp_path / "a.png"
    image.write_bytes(png_bytes((1, 2, 3)))
    train = [CaptionPair(str(image), "a red circle", "id1")]
    ours = run_identity(cfg, Splits(train))
    assert identity_differences(ours, ours) == []
    moved = [CaptionPair(str(tmp_path / "elsewhere" / "a.png"), "a red circle", "id1")]  # a re-download moves files
    assert identity_differences(run_identity(cfg, Splits(moved)), ours) == ["other train data (1 pairs there, 1 now: "
                                                                             "the same count, other items, captions "
                                                                             "or images)"]
    theirs = run_identity(build_config(cfg.model_dump(), {"learning_rate": 0.5, "batch_size": 7}), Splits(train))
    assert identity_differences(theirs, ours) == ["learning_rate 0.5 there, 0.001 now"]  # batch_size: not training
    assert "older version" in identity_differences(None, ours)[0]


def test_an_output_folder_is_checked_for_what_it_holds(tmp_path: Path) -> None:
    data = tmp_path / "download"
    (data / "json").mkdir(parents=True)
    table = tmp_path / "pairs.csv"
    table.write_text("filepath,caption\n")
    assert check_output_folder(tmp_path / "model", [table]) == tmp_path / "model"  # beside a table: fine
    for out, data_paths, says in ((table, [], "is a file"), (data, [data], "mix the model"),
                                  (data / "model", [data], "mix the model"), (tmp_path, [data], "mix the model"),
                                  (tmp_path / "table-folder", [tmp_path / "table-folder" / "t.csv"], "mix")):
        (tmp_path / "table-folder").mkdir(exist_ok=True)
        with pytest.raises(RunFolderError, match=says):
            check_output_folder(out, data_paths)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"already holds 1 other files \(notes.txt\); overwrite replaces"):
        check_output_folder(tmp_path / "busy")
    assert check_output_folder(tmp_path / "busy", overwrite=True) == tmp_path / "busy"


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path: Path) -> None:
    with writer_lock(tmp_path), pytest.raises(RunFolderError, match="being written by another training"):
        with writer_lock(tmp_path):
            pass
    with writer_lock(tmp_path):  # released: the next writer gets it
        pass


def test_the_weights_file_gets_the_permissions_of_its_siblings(tmp_path: Path) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    out = save_artifact(load_model(cfg), tmp_path / "model", cfg, {"after": {}})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert modes["open_clip_model.safetensors"] & 0o044 == 0o044  # readable by group and others (umask 022)


# ---------------------------------------------------------------------------------------------- boundaries
def test_the_system_refusing_a_named_file_becomes_one_clean_error() -> None:
    named = user_error(PermissionError(errno.EACCES, "Permission denied", "/data/x.csv"))
    assert isinstance(named, InputError) and str(named) == "'/data/x.csv': permission denied; check its permissions"
    full = user_error(OSError(errno.ENOSPC, "No space left on device"))
    assert str(full) == "no space left on device; free some disk space or write elsewhere"
    long = str(user_error(FileNotFoundError(errno.ENOENT, "No such file", "n" * 5000)))
    assert len(long) < 300 and "(5002 characters)" in long
    for ours_to_fix in (ValueError("bug"), KeyError("k"), BrokenPipeError(errno.EPIPE, "pipe"), OSError("no file")):
        assert user_error(ours_to_fix) is None  # a bug of ours stays a traceback


def test_the_python_api_raises_clean_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="NUL character"):
        fit(str(TINY_MODEL), str(tmp_path / "a\0b.csv"), runs_dir=tmp_path / "runs", pretrained=None)
    with pytest.raises(ConfigError, match="learning_rate: Input should be a finite number"):
        fit(str(TINY_MODEL), [("a.png", "x")], runs_dir=tmp_path / "runs", learning_rate=float("nan"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match="a-file"):  # an OSError from the system, named
        fit(str(TINY_MODEL), [("a.png", "x")], runs_dir=tmp_path / "a-file" / "runs", pretrained=None)
    with pytest.raises(ModelError, match="is not a saved model folder"):
        get_model(tmp_path, "clip-text")
    with pytest.raises(ConfigError, match="not a usable folder name"):
        get_run("../etc", tmp_path / "runs")
    with pytest.raises(ConfigError, match="what get_model"):
        encode("not an encoder", ["text"])  # type: ignore[arg-type]


def test_the_api_refuses_odd_items_to_encode_and_to_overwrite_a_folder(tmp_path: Path) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    model_dir = save_artifact(load_model(cfg), tmp_path / "model", cfg)
    with pytest.raises(DataError, match="image paths or PIL images"):
        encode(get_model(model_dir, "clip-vision"), [123])
    run_dir = create_run(tmp_path / "runs", "done", {"config": {}})
    update_state(run_dir, status="finished")
    (run_dir / "model").mkdir()
    (run_dir / "model" / "weights").write_text("w")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("mine")
    with pytest.raises(RunError, match="already holds 1 files"):
        Run(run_dir).save_artifact(tmp_path / "busy")
    assert (Run(run_dir).save_artifact(tmp_path / "busy", overwrite=True) / "weights").is_file()
    (tmp_path / "runs" / "damaged").mkdir()
    (tmp_path / "runs" / "damaged" / "state.json").write_text("{oops")  # skipped by list_runs, refused by get_run
    assert [run.name for run in list_runs(tmp_path / "runs")] == ["done"]
    with pytest.raises(DataError, match="damaged/state.json' is not valid JSON"):
        get_run("damaged", tmp_path / "runs").status()


def test_the_adapters_platform_calls_are_guarded() -> None:
    import dtlpy as dl

    from adapters.clip_finetune.dataloop.adapter import ClipAdapter
    from adapters.clip_finetune.dataloop.boundary import PLATFORM_CALLS

    assert all(hasattr(getattr(ClipAdapter, name), "__wrapped__") for name in PLATFORM_CALLS)
    assert ClipAdapter.evaluate_model.__dtlpy__ == dl.BaseModelAdapter.evaluate_model.__dtlpy__  # kept for dtlpy
    with pytest.raises(InputError, match="too long"):  # the system refusing a name, as one clean error
        ClipAdapter().convert_from_dtlpy("n" * 5000)
