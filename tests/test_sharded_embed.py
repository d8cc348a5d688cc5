"""Sharded embedding (shards.py): torchrun ranks write one part each plus an index that joins them to exactly
the single-process result; re-runs skip finished parts; parts of another job are refused, never mixed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from adapters.clip_finetune.cli.advice import cli_message
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.errors import DataError
from adapters.clip_finetune.model.clip import load_model, save_artifact
from adapters.clip_finetune.retrieval.shards import ShardSpec, shard_range, shard_spec
from adapters.clip_finetune.retrieval.store import load_embeddings

PARTS = ["part-00000-of-00002.npz", "part-00001-of-00002.npz"]
CORRUPT = (5, 20)  # one undecodable image in each half of the 26


def _save_model(tiny_model_config: Path, out: Path, seed: int) -> Path:
    cfg = {"model_name": str(tiny_model_config), "pretrained": None, "device": "cpu", "seed": seed}
    return save_artifact(load_model(build_config(cfg)), out)  # random init under the seed


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def model_dir(root: Path, tiny_model_config: Path) -> Path:
    return _save_model(tiny_model_config, root / "model", seed=0)


@pytest.fixture(scope="module")
def images(root: Path) -> Path:
    """26 small PNG and JPEG files, two of them not images at all."""
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(26):
        path = folder / f"img_{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
        if i in CORRUPT:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (24 + i, 32, 3), dtype=np.uint8)).save(path)
    return folder


def _embed(model: Path, source: list[str], out: Path, *extra: str) -> int:
    return main(["embed", "--model", str(model), *source, "--out", str(out), "--set", "num_workers=0", *extra])


@pytest.fixture(scope="module")
def reference(root: Path, model_dir: Path, images: Path) -> Path:
    """The whole input embedded by one plain process into one .npz."""
    out = root / "single.npz"
    assert _embed(model_dir, ["--images", str(images)], out) == 0
    return out


@pytest.fixture(scope="module")
def sharded(root: Path, model_dir: Path, images: Path) -> tuple[Path, str]:
    """`torchrun --nproc_per_node 2 --standalone -m adapters.clip_finetune embed ...`: (out folder, its output)."""
    out = root / "sharded"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "adapters.clip_finetune", "embed", "--model", str(model_dir), "--images", str(images),
           "--out", str(out), "--set", "num_workers=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout + proc.stderr


def _copy(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))  # copy2: modification times kept


def _state(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_torchrun_shards_join_to_exactly_the_single_process_embedding(sharded, reference, model_dir, capsys) -> None:
    folder, output = sharded
    assert sorted(p.name for p in folder.iterdir()) == sorted([*PARTS, "index.json"])
    assert "shard 0 of 2: wrote 12 vectors" in output and "shard 1 of 2: wrote 12 vectors" in output
    index = json.loads((folder / "index.json").read_text())
    assert [p["file"] for p in index["parts"]] == PARTS
    parts = [(p["start"], p["stop"], p["count"], p["skipped"]) for p in index["parts"]]
    assert parts == [(0, 13, 12, 1), (13, 26, 12, 1)]  # one undecodable image in each half, counted
    assert (index["num_shards"], index["inputs"], index["total"], index["skipped"], index["dim"]) == (2, 26, 24, 2, 64)

    ref_ids, ref_vectors = load_embeddings(reference)
    assert len(ref_ids) == 24
    for path in (folder, folder / "index.json"):
        ids, vectors = load_embeddings(path)
        assert ids == ref_ids and vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, ref_vectors, atol=1e-5)
    with np.load(folder / PARTS[1]) as part:  # each part is a plain embeddings .npz too
        assert part["ids"].tolist() == ref_ids[12:]

    # search reads the folder like an embeddings file
    capsys.readouterr()
    assert main(["search", "--model", str(model_dir), "--index", str(folder), "-k", "3", "a photo"]) == 0
    hits = capsys.readouterr().out.splitlines()[1:]
    assert len(hits) == 3 and all(h.split()[-1] in ref_ids for h in hits)


@pytest.mark.slow
def test_rerun_skips_finished_parts_and_recomputes_only_a_deleted_one(sharded, model_dir, images, tmp_path,
                                                                      capsys, caplog) -> None:
    caplog.set_level(logging.INFO, logger="adapters.clip_finetune.retrieval.shards")
    folder = _copy(sharded[0], tmp_path / "out")
    joined = load_embeddings(folder)
    before = _state(folder)
    shard = ["--images", str(images)]
    for i in (0, 1):
        assert _embed(model_dir, shard, folder, "--num-shards", "2", "--shard-index", str(i)) == 0
    out = capsys.readouterr().out
    assert out.count("already done, skipping") == 2 and "wrote" not in out
    assert caplog.text.count("already done, skipping") == 2
    assert _state(folder) == before  # parts and index untouched

    (folder / PARTS[1]).unlink()
    (folder / "index.json").unlink()
    assert _embed(model_dir, shard, folder, "--num-shards", "2", "--shard-index", "0") == 0
    out = capsys.readouterr().out
    assert "already done, skipping" in out and "other parts still missing" in out
    assert not (folder / "index.json").exists()
    assert _embed(model_dir, shard, folder, "--num-shards", "2", "--shard-index", "1") == 0
    out = capsys.readouterr().out
    assert "shard 1 of 2: wrote 12 vectors" in out and "all 2 parts done" in out
    assert _state(folder)[PARTS[0]] == before[PARTS[0]]  # untouched
    ids, vectors = load_embeddings(folder)
    assert ids == joined[0]
    np.testing.assert_allclose(vectors, joined[1], atol=1e-5)
    assert json.loads((folder / "index.json").read_text())["total"] == 24


@pytest.mark.slow
def test_a_folder_of_another_job_is_an_error_and_is_left_alone(sharded, model_dir, images, tiny_model_config,
                                                              tmp_path, capsys) -> None:
    folder = _copy(sharded[0], tmp_path / "out")
    before = _state(folder)
    other_model = _save_model(tiny_model_config, tmp_path / "other_model", seed=1)
    more_images = _copy(images, tmp_path / "more_images")
    Image.new("RGB", (32, 32), "red").save(more_images / "zz_new.png")
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square\n")
    cases = [
        (other_model, ["--images", str(images)], "2", "a different model"),
        (model_dir, ["--images", str(more_images)], "2", "different inputs: 26 images there, 27 now"),
        (model_dir, ["--images", str(images)], "3", "2 shards there, 3 now"),
        (model_dir, ["--texts", str(texts)], "2", "it embeds images, this run texts"),
    ]
    for model, source, num_shards, reason in cases:
        assert _embed(model, source, folder, "--num-shards", num_shards, "--shard-index", "1") == 2
        err = capsys.readouterr().err
        assert "belongs to another embedding job" in err and reason in err, err
        assert "use a new --out folder, or delete" in err
    assert _state(folder) == before  # nothing written, nothing removed

    (folder / "index.json").unlink()  # the parts alone are checked too
    assert _embed(model_dir, ["--images", str(images)], folder, "--num-shards", "3", "--shard-index", "0") == 2
    assert "is a part of a 2-shard job, this run has 3 shards" in capsys.readouterr().err

    assert _embed(model_dir, ["--images", str(images)], tmp_path / "x.npz", "--num-shards", "2",
                  "--shard-index", "0") == 2
    assert "with sharding, --out is a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_loading_a_folder_with_a_missing_part_names_the_missing_shard(sharded, tmp_path) -> None:
    folder = _copy(sharded[0], tmp_path / "out")
    (folder / PARTS[1]).unlink()
    message = r"incomplete: 1 of 2 parts missing: shard 1 \(part-00001-of-00002\.npz\)"
    with pytest.raises(DataError, match=message):
        load_embeddings(folder)
    (folder / "index.json").unlink()  # without the index: from the part files' names
    with pytest.raises(DataError, match=message):
        load_embeddings(folder / "index.json")
    with pytest.raises(DataError, match=message):
        load_embeddings(folder)


def test_texts_shard_the_same_way_even_into_empty_parts(model_dir, tmp_path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square\na green ring\na yellow star\n")
    assert _embed(model_dir, ["--texts", str(texts)], tmp_path / "single.npz") == 0
    for i in range(5):  # 4 texts in 5 shards: shard 0 is empty
        assert _embed(model_dir, ["--texts", str(texts)], tmp_path / "out", "--num-shards", "5",
                      "--shard-index", str(i)) == 0
    ids, vectors = load_embeddings(tmp_path / "out")
    ref_ids, ref_vectors = load_embeddings(tmp_path / "single.npz")
    assert ids == ref_ids and json.loads((tmp_path / "out" / "index.json").read_text())["parts"][0]["count"] == 0
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-5)


def test_the_shard_comes_from_the_flags_or_from_torchrun() -> None:
    assert shard_spec(None, None, {}) is None
    assert shard_spec(None, None, {"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: a plain run
    assert shard_spec(None, None, {"RANK": "3", "WORLD_SIZE": "4"}) == ShardSpec(3, 4, "torchrun")
    assert shard_spec(1, 3, {}) == ShardSpec(1, 3, "shard_index/num_shards")
    for index, count, env, message, flags in [
            (1, None, {}, "shard_index and num_shards go together", "--shard-index and --num-shards go together"),
            (3, 3, {}, "shard_index=3 num_shards=3: need 0 <= shard index < number of shards",
             "--shard-index 3 --num-shards 3: need"),
            (0, 2, {"RANK": "0", "WORLD_SIZE": "2"}, "shard_index/num_shards under torchrun",
             "--shard-index/--num-shards under")]:
        with pytest.raises(DataError, match=message) as e:
            shard_spec(index, count, env)
        assert cli_message(e.value).startswith(flags)  # the command line says its flags


def test_shard_ranges_cover_every_input_once_in_order() -> None:
    for n in (0, 1, 5, 26, 1001):
        for count in (1, 2, 3, 7, 64):
            ranges = [shard_range(n, i, count) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(ranges, ranges[1:], strict=False))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
