"""A hostile corpus through the `clip-finetune` command line: every case is one command line; each must end with
the exit code and the message its class promises (docs/reliability.md, "Bad input"), never a traceback or a hang.

The cases run in ONE subprocess (tests/cli_batch.py: the package imports once; a case past 60 s is stopped and
reported hung), so the corpus costs seconds, not a Python start per case. One case also runs as a plain
`python -m adapters.clip_finetune` process, for the exit code a shell sees.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_MODEL, TINY_TRAINING, set_args

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.load import load_splits
from adapters.clip_finetune.data.synthetic import write_csv, write_dataloop_download
from adapters.clip_finetune.model.clip import load_artifact, load_model, save_artifact
from adapters.clip_finetune.retrieval.embed import encode_items
from adapters.clip_finetune.retrieval.provenance import made_by
from adapters.clip_finetune.retrieval.store import save_embeddings
from adapters.clip_finetune.training import finetune
from adapters.clip_finetune.training.guard import writer_lock

HAS_PARQUET = all(importlib.util.find_spec(m) for m in ("pandas", "pyarrow"))


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # {r} stands for the corpus folder, {tiny} for the tiny architecture's settings
    rc: int
    says: tuple[str, ...] = ()  # all in stderr (rc != 0) or in stdout (rc 0)


M = "{r}/model"  # a saved tiny model; {tiny} in a command expands to the tiny architecture's --set options
EMBED_WITH = "embed --texts {r}/texts.txt --out {r}/o.npz --model "  # + a model folder


def c(name: str, argv: str, rc: int = 2, *says: str) -> Case:
    return Case(name, tuple(argv.split()), rc, says)


CASES = [
    # --- configuration files and values
    c("config is a folder", "config --config {r}/folder", 2, "is a folder"),
    c("config is binary", "config --config {r}/binary.json", 2, "not UTF-8"),
    c("config nested 100,000 deep", "config --config {r}/deep.json", 2, "nested deeper than 100 levels"),
    c("config is a FIFO", "config --config {r}/fifo.json", 2, "FIFO"),
    c("config is /dev/zero", "config --config /dev/zero", 2, "character device"),
    c("config is missing", "config --config {r}/missing.json", 2, "does not exist"),
    c("config is 2 MB", "config --config {r}/big.json", 2, "larger than 1 MB"),
    c("config is a list", "config --config {r}/list.json", 2, "JSON object"),
    c("config is Latin-1", "config --config {r}/latin1.json", 2, "not UTF-8", "looks like"),
    c("device=banana", "config --set device=banana", 2, "device:", "unknown torch device"),
    c("num_epochs=true", "config --set num_epochs=true", 2, "num_epochs:", "not true/false"),
    c("learning_rate=NaN", "config --set learning_rate=NaN", 2, "learning_rate:", "finite number"),
    c("seed past numpy's range", "config --set seed=99999999999", 2, "seed:"),
    c("--set without =", "config --set oops", 2, "expected key=value"),
    c("--set nested deep", "config --set betas={r}/DEEP_VALUE", 2, "nested too deeply"),
    c("model_name of 5,000 characters", "config --set model_name={r}/LONG_NAME.json", 2, "too long", "characters"),
    c("a device this machine lacks", EMBED_WITH + M + " --set device=cuda:99", 2, "cuda:99", "not available"),
    # --- models: weights and configs that are broken, forged, of another model, or pickles
    c("weights are garbage", EMBED_WITH + "{r}/m-garbage", 2, "not a whole safetensors file"),
    c("weights are truncated", EMBED_WITH + "{r}/m-truncated", 2, "not a whole safetensors file"),
    c("weights header bomb", EMBED_WITH + "{r}/m-header-bomb", 2, "header too large"),
    c("model config not JSON", EMBED_WITH + "{r}/m-bad-json", 2, "open_clip_config.json", "not valid JSON"),
    c("model config without model_cfg", EMBED_WITH + "{r}/m-no-model-cfg", 2, "has no model_cfg"),
    c("model config a tower cannot build", EMBED_WITH + "{r}/m-odd-arch", 2, "cannot build the architecture"),
    c("weights of another shape", EMBED_WITH + "{r}/m-wrong-shape", 2, "do not fit", "size mismatch"),
    c("unknown architecture", "config --set model_name=ViT-Q-99", 2, "unknown architecture"),
    c("a pickle as pretrained", "embed --texts {r}/texts.txt --out {r}/o.npz {tiny} --set pretrained={r}/evil.bin",
      2, "will not be loaded", "can run code"),
    c("a pickle as the WiSE-FT base", "evaluate --model {r}/m-pickle-base --data {r}/pairs.csv --wise-ft 0.5", 2,
      "will not be loaded"),
    c("a damaged WiSE-FT base", "evaluate --model " + M + " --data {r}/pairs.csv --wise-ft 0.5 --base {r}/m-truncated",
      2, "not a whole safetensors file"),
    # --- data files: encodings, non-files, nothing usable
    c("table in Latin-1", "evaluate --model " + M + " --data {r}/latin1.csv", 2, "not UTF-8", "looks like"),
    c("table in UTF-16 without BOM", "evaluate --model " + M + " --data {r}/utf16-no-bom.csv", 2, "UTF-16"),
    c("table is a FIFO", "evaluate --model " + M + " --data {r}/fifo.csv", 2, "FIFO"),
    c("data is /dev/zero", "evaluate --model " + M + " --data /dev/zero", 2, "not a dataset"),
    c("texts file in Latin-1", "embed --model " + M + " --texts {r}/latin1.txt --out {r}/o.npz", 2, "not UTF-8"),
    c("a 1 MB one-word caption", "embed --model " + M + " --texts {r}/one-word.txt --out {r}/word.npz", 0,
      "wrote 1 vectors"),
    c("images that are FIFOs, loops, devices", "embed --model " + M + " --images {r}/odd-images --out {r}/odd.npz",
      0, "wrote 2 vectors"),
    # --- outputs, checked before any work (the model named does not exist: the output is checked first)
    c("embed to a bad suffix", "embed --model {r}/nowhere --texts {r}/texts.txt --out {r}/o.txt", 2, "--out", ".npz"),
    c("embed into a file's folder", "embed --model {r}/nowhere --texts {r}/texts.txt --out {r}/texts.txt/o.npz", 2,
      "is a file, not a folder"),
    c("embed to a folder", "embed --model {r}/nowhere --texts {r}/texts.txt --out {r}/folder", 2, "--out",
      ".npz"),
    *([] if HAS_PARQUET else [c("embed to parquet without pyarrow", "embed --model {r}/nowhere --texts "
                                "{r}/texts.txt --out {r}/o.parquet", 2, "pyarrow")]),
    c("train into a file", "train --data {r}/pairs.csv --out {r}/texts.txt {tiny}", 2, "is a file"),
    c("train under a file", "train --data {r}/pairs.csv --out {r}/texts.txt/model {tiny}", 2, "not a folder"),
    c("train into the data folder", "train --data {r}/download --out {r}/download/model {tiny}", 2, "mix the model"),
    c("train over a saved model", "train --data {r}/pairs.csv --out " + M + " {tiny}", 2, "already holds a saved model",
      "--overwrite"),
    c("train over an unfinished run", "train --data {r}/pairs.csv --out {r}/interrupted {tiny}", 2,
      "unfinished run", "--resume"),
    c("a second writer", "train --data {r}/pairs.csv --out {r}/locked --overwrite {tiny}", 2, "being written by"),
    c("save a mix over a model", "evaluate --model " + M + " --data {r}/pairs.csv --wise-ft 0.5 --base " + M +
      " --save-mix " + M, 2, "already holds a saved model"),
    # --- resume of another run's checkpoint: the difference is named
    c("resume with another learning rate", "train --data {r}/pairs.csv --out {r}/interrupted --resume {tiny} "
      "--set learning_rate=0.002", 2, "belongs to another run", "learning_rate 0.001 there, 0.002 now"),
    c("resume with other epochs", "train --data {r}/pairs.csv --out {r}/interrupted --resume {tiny} --set num_epochs=3",
      2, "num_epochs 2 there, 3 now"),
    c("resume with other data", "train --data {r}/other.csv --out {r}/interrupted --resume {tiny}", 2,
      "other train data"),
    c("resume a planted pickle", "train --data {r}/pairs.csv --out {r}/planted --resume {tiny}", 2,
      "will not be loaded", "can run code"),
    # --- search: k, and indexes that are broken, NaN, or made by another model or of texts
    c("-k 0", "search --model " + M + " --index {r}/images.npz -k 0 q", 2, "-k", "at least 1"),
    c("-k -38", "search --model " + M + " --index {r}/images.npz -k -38 q", 2, "-k", "at least 1"),
    c("index of another model", "search --model " + M + " --index {r}/other-model.npz q", 2, "other weights",
      "--allow-mismatch"),
    c("index of texts", "search --model " + M + " --index {r}/texts.npz q", 2, "holds texts vectors"),
    c("index of texts, allowed", "search --model " + M + " --index {r}/texts.npz --allow-mismatch -k 1 red",
      0, "1."),
    c("index with NaN", "search --model " + M + " --index {r}/nan.npz q", 2, "NaN"),
    c("index without vectors", "search --model " + M + " --index {r}/no-vectors.npz q", 2, "no 'vectors'"),
    c("index of object arrays", "search --model " + M + " --index {r}/objects.npz q", 2, "Python objects",
      "will not be loaded"),
    c("index of 1-D vectors", "search --model " + M + " --index {r}/one-dim.npz q", 2, "2-D"),
    c("index with more ids than vectors", "search --model " + M + " --index {r}/lengths.npz q", 2, "3 ids for 2"),
    c("index truncated", "search --model " + M + " --index {r}/truncated.npz q", 2, "not a readable .npz"),
    c("index header claims 4 TB", "search --model " + M + " --index {r}/forged.npz q", 2, "truncated or forged"),
    c("index is a FIFO", "search --model " + M + " --index {r}/fifo.npz q", 2, "FIFO"),
    c("search that works", "search --model " + M + " --index {r}/images.npz -k 2 a red circle", 0, " 1. ", " 2. "),
]


def test_the_corpus_has_a_case_per_name() -> None:
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("bad-input")
    _config_files(r)
    pairs = write_csv(r / "pairs.csv", 32, seed=11)
    write_csv(r / "other.csv", 32, seed=12)
    write_dataloop_download(r / "download", 8, 0, seed=13)
    _models(r)
    _tables_and_texts(r, pairs)
    _indexes(r, pairs)
    _run_folders(r, pairs)
    return r


def _config_files(r: Path) -> None:
    (r / "folder").mkdir()
    (r / "binary.json").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2000)))
    (r / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (r / "big.json").write_text('{"a": "' + "x" * (2 << 20) + '"}')
    (r / "list.json").write_text("[1, 2]")
    (r / "latin1.json").write_bytes('{"model_name": "café"}'.encode("latin-1"))
    for fifo in ("fifo.json", "fifo.csv", "fifo.npz"):
        os.mkfifo(r / fifo)


def _models(r: Path) -> None:
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    model = save_artifact(load_model(cfg), r / "model", cfg)
    weights = (model / "open_clip_model.safetensors").read_bytes()
    broken = {
        "garbage": ("open_clip_model.safetensors", b"not a safetensors file" * 10),
        "truncated": ("open_clip_model.safetensors", weights[: len(weights) // 2]),
        "header-bomb": ("open_clip_model.safetensors", struct.pack("<Q", 2**62) + b"{}"),
        "bad-json": ("open_clip_config.json", b"{oops"),
        "no-model-cfg": ("open_clip_config.json", b"{}"),
        "odd-arch": ("open_clip_config.json", json.dumps({"model_cfg": {
            "embed_dim": 64, "vision_cfg": {"layers": "twelve"}, "text_cfg": {}}}).encode()),
        "wrong-shape": ("open_clip_config.json", json.dumps({"model_cfg": {
            **json.loads(TINY_MODEL.read_text()), "embed_dim": 32}}).encode()),
    }
    for name, (file, content) in broken.items():
        shutil.copytree(model, r / f"m-{name}")
        (r / f"m-{name}" / file).write_bytes(content)
    _malicious_pickle(r / "evil.bin", r / "pwned")
    shutil.copytree(model, r / "m-pickle-base")  # a model whose finetune_config.json names a pickle as its base
    saved = json.loads((model / "finetune_config.json").read_text())
    (r / "m-pickle-base" / "finetune_config.json").write_text(json.dumps({**saved, "pretrained": str(r / "evil.bin")}))


class _Pwn:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling runs `touch marker`
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": _Pwn(marker)}, protocol=2))


def _tables_and_texts(r: Path, pairs: Path) -> None:
    rows = pairs.read_text().splitlines()
    accented = [rows[0], *(f"{line}, café crème" if "," in line else line for line in rows[1:])]
    (r / "latin1.csv").write_bytes("\n".join(accented).encode("latin-1"))
    (r / "utf16-no-bom.csv").write_bytes("\n".join(rows).encode("utf-16-le"))
    (r / "texts.txt").write_text("a red circle on the left\na blue square at the top\n")
    (r / "latin1.txt").write_bytes("un café crème\nrésumé\n".encode("latin-1"))
    word = np.random.default_rng(1).integers(ord("a"), ord("z") + 1, 1_000_000, dtype=np.uint8).tobytes().decode()
    (r / "one-word.txt").write_text(word + "\n")  # open_clip's BPE on it in full: hours
    odd = r / "odd-images"
    odd.mkdir()
    images = sorted((pairs.parent / "images").glob("*.png"))[:2]
    for image in images:
        shutil.copy(image, odd / image.name)
    os.mkfifo(odd / "fifo.png")
    os.symlink(odd / "loop-b.png", odd / "loop-a.png")
    os.symlink(odd / "loop-a.png", odd / "loop-b.png")
    os.symlink("/dev/zero", odd / "zero.png")


def _indexes(r: Path, pairs: Path) -> None:
    """Indexes embedded by the model, by another one, of texts; and broken, NaN, forged ones."""
    clip = load_artifact(r / "model", "cpu")
    other = load_model(build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL), "seed": 7}), "cpu")
    images = sorted(str(p) for p in (pairs.parent / "images").glob("*.png"))[:8]
    for name, model, kind, items in (("images", clip, "images", images), ("other-model", other, "images", images),
                                     ("texts", clip, "texts", ["a red circle", "a blue square"])):
        ids, vectors, _ = encode_items(model, kind, items, 8, 0, progress=False)
        save_embeddings(r / f"{name}.npz", ids, vectors, made_by(model, kind))
    vectors = np.eye(2, 64, dtype=np.float32)
    np.savez(r / "nan.npz", ids=np.array(["a", "b"]), vectors=np.where(np.eye(2, 64) > 0, np.nan, 0).astype("f4"))
    np.savez(r / "no-vectors.npz", ids=np.array(["a"]))
    np.savez(r / "objects.npz", ids=np.array(["a"], dtype=object), vectors=vectors[:1])
    np.savez(r / "one-dim.npz", ids=np.array(["a"]), vectors=vectors[0])
    np.savez(r / "lengths.npz", ids=np.array(["a", "b", "c"]), vectors=vectors)
    np.savez(r / "plain.npz", ids=np.array(["a", "b"]), vectors=vectors)
    plain = (r / "plain.npz").read_bytes()
    (r / "truncated.npz").write_bytes(plain[: len(plain) // 2])
    # a vectors header claiming 10^12 x 1024 floats over 512 bytes: numpy would allocate it before reading
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 1024)}
    with zipfile.ZipFile(r / "forged.npz", "w") as z:
        z.writestr("ids.npy", _npy(np.array(["a"])))
        z.writestr("vectors.npy", _npy_header(header) + bytes(512))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npy_header(header: dict) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)  # magic and header: what np.load reads first
    return buffer.getvalue()


def _run_folders(r: Path, pairs: Path) -> None:
    """A run interrupted after its first checkpoint; a folder holding a planted pickle as its checkpoint."""
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL), "num_epochs": 2, "checkpoint_every_steps": 1})

    class Stop(Exception):
        pass

    def stop(_: Path) -> None:
        raise Stop

    with pytest.raises(Stop):
        finetune(cfg, load_splits(pairs), r / "interrupted", on_checkpoint=stop, progress=False)
    (r / "planted").mkdir()
    _malicious_pickle(r / "planted" / "checkpoint.pt", r / "pwned")
    (r / "locked").mkdir()


def _expand(case: Case, r: Path) -> list[str]:
    tiny = set_args({**TINY_TRAINING, "model_name": str(TINY_MODEL), "num_epochs": 2, "checkpoint_every_steps": 1})
    argv: list[str] = []
    for arg in case.argv:
        if arg == "{tiny}":
            argv += tiny
            continue
        arg = arg.replace("{r}", str(r))
        arg = arg.replace(f"{r}/DEEP_VALUE", "[" * 5000 + "]" * 5000).replace(f"{r}/LONG_NAME", "n" * 5000)
        argv.append(arg)
    return argv


@pytest.fixture(scope="module")
def results(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case's outcome, from one run of tests/cli_batch.py (the `locked` folder is held by this process)."""
    cases_file = tmp_path_factory.mktemp("cases") / "cases.json"
    cases_file.write_text(json.dumps([_expand(case, corpus) for case in CASES]))
    with writer_lock(corpus / "locked"):
        done = subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py"), str(cases_file)], cwd=corpus,
                              capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(CASES), done.stderr[-3000:]
    (tmp_path_factory.getbasetemp() / "bad-input-seconds.json").write_text(json.dumps(
        {case.name: line["seconds"] for case, line in zip(CASES, lines, strict=True)}, indent=1))
    return {case.name: line for case, line in zip(CASES, lines, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gives_its_clear_error_never_a_traceback_or_a_hang(case: Case, results: dict) -> None:
    got = results[case.name]
    assert not got["hung"], f"{case.name}: still running after 60 s"
    assert got["traceback"] is None, got["traceback"]
    assert got["rc"] == case.rc, (got["rc"], got["err"][-2000:])
    shown = got["err"] if case.rc else got["out"]
    assert all(text in shown for text in case.says), shown[-2000:]
    if case.rc == 2 and "usage:" not in got["err"]:  # ours, not argparse's: one message, named command
        assert f"clip-finetune {case.argv[0]}: error:" in got["err"]
    assert "weights_only=False" not in got["err"] and "Traceback" not in got["err"]


def test_no_planted_pickle_ran(results: dict, corpus: Path) -> None:
    assert not (corpus / "pwned").exists()


def test_outputs_are_refused_before_any_work(results: dict, corpus: Path) -> None:
    """The output cases name a model that does not exist: the output is what they are refused for."""
    for name in ("embed to a bad suffix", "embed into a file's folder", "embed to a folder"):
        assert "nowhere" not in results[name]["err"]
    assert not (corpus / "download" / "model").exists() and (corpus / "texts.txt").is_file()


def test_a_shell_sees_exit_code_2_and_one_line(corpus: Path) -> None:
    folder = str(corpus / "folder")
    done = subprocess.run([sys.executable, "-m", "adapters.clip_finetune", "config", "--config", folder],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"clip-finetune config: error: --config: {folder!r} is a folder, not a file; give a regular file"]
