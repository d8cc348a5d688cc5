"""The partitioned approximate index (retrieval/scann_index.py): recall against brute force on CLIP-like vectors
(text queries across a modality gap: bench/clip_like.py) with exact scores, add/remove/replace without a rebuild,
a save that round-trips and fails whole, a damaged index as a clear error, and `clip-finetune index --method`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAINING, set_args

pytest.importorskip("scann", reason='the partitioned index needs scann: pip install ".[index]" (Linux)')

from adapters.clip_finetune.cli.advice import cli_message
from adapters.clip_finetune.cli.main import main  # noqa: E402
from adapters.clip_finetune.data.synthetic import write_csv  # noqa: E402
from adapters.clip_finetune.errors import DataError  # noqa: E402
from adapters.clip_finetune.retrieval import scann_index  # noqa: E402
from adapters.clip_finetune.retrieval.index import Index, open_index  # noqa: E402
from adapters.clip_finetune.retrieval.ranking import top_k  # noqa: E402
from adapters.clip_finetune.retrieval.scann_index import ScannSettings, build_scann, open_scann  # noqa: E402
from bench.clip_like import ClipLike  # noqa: E402

N, DIM, K = 8000, 64, 10  # above scann_index.SMALL: leaves and 4-bit codes are trained


@pytest.fixture(scope="module")
def clip_like() -> tuple[list[str], np.ndarray, np.ndarray]:
    gen = ClipLike(DIM, N, seed=1)
    return [f"item-{i}" for i in range(N)], np.concatenate(list(gen.images())), gen.texts(200)


@pytest.fixture(scope="module")
def built(clip_like) -> scann_index.ScannIndex:
    ids, vectors, _ = clip_like
    return build_scann(ids, vectors, {"kind": "images", "model": "m", "model_sha256": "ab" * 32})


def _exact(ids: list[str], vectors: np.ndarray, queries: np.ndarray, k: int) -> list[list[str]]:
    rows, _ = top_k(queries @ vectors.T, k)
    return [[ids[r] for r in row] for row in rows]


def _recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_recall_against_brute_force_with_exact_scores(clip_like, built) -> None:
    ids, vectors, queries = clip_like
    assert isinstance(built, Index) and len(built) == N and built.leaves > 1
    found, scores = built.search(queries, K)
    truth = _exact(ids, vectors, queries, K)
    assert _recall(found, truth) >= 0.98
    row_of = {item: n for n, item in enumerate(ids)}
    exact = np.array([[q @ vectors[row_of[i]] for i in row] for q, row in zip(queries, found, strict=True)])
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-6)  # re-ranked: the exact cosines, best first
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    # the share of leaves searched is the lever: a twentieth of them misses more
    narrow = scann_index.ScannIndex(built._searcher, built._vectors, list(built._row_ids), list(built._points),
                                    None, ScannSettings(search_share=0.05, min_scored=1), built.leaves)
    assert _recall(narrow.search(queries, K)[0], truth) < _recall(found, truth) - 0.05



def test_a_batch_split_over_threads_answers_as_one_thread(clip_like, built) -> None:
    _, _, queries = clip_like
    one_ids, one_scores = built.search(queries, K, threads=1)
    for threads in (2, 3, len(queries) + 5):  # uneven parts, and more threads than queries (one query a part)
        ids, scores = built.search(queries, K, threads=threads)
        assert ids == one_ids
        np.testing.assert_array_equal(scores, one_scores)
    assert built.search(queries[:1], K, threads=4)[0] == one_ids[:1]

def test_add_remove_and_replace_without_a_rebuild(clip_like) -> None:
    ids, vectors, queries = clip_like
    index = build_scann(ids[:6000], vectors[:6000])
    searcher = index._searcher
    index.add(ids[6000:], vectors[6000:])
    assert index._searcher is searcher and len(index) == N
    gone = _exact(ids, vectors, queries[:5], 3)[0] + ids[-3:]  # ScaNN moves its last points into the holes
    assert index.remove([*gone, "never-stored"]) == 6 and len(index) == N - 6
    found, _ = index.search(queries, K)
    assert not set(gone) & {i for row in found for i in row}
    kept = [n for n, i in enumerate(ids) if i not in set(gone)]
    assert _recall(found, _exact([ids[n] for n in kept], vectors[kept], queries, K)) >= 0.98
    moved = ids[10]
    index.add([moved, gone[0], moved], queries[:3])  # replacing; an id twice in one call: the later vector
    found, scores = index.search(queries[:3], 1)
    assert found == [[gone[0]], [gone[0]], [moved]] and np.allclose(scores[[1, 2]], 1.0, atol=1e-5)
    assert index.ids().count(moved) == 1 and len(index) == N - 5 and len(index.ids()) == len(index)


def test_small_collections_are_scored_one_by_one(clip_like) -> None:
    ids, vectors, queries = clip_like
    index = build_scann(ids[:50], vectors[:50])
    assert index.leaves == 0 and "every vector scored" in index.describe()
    assert index.search(queries, K)[0] == _exact(ids[:50], vectors[:50], queries, K)
    index.remove(ids[:50])
    assert index.search(queries[:1], K)[0] == [[]]


def test_save_and_open_round_trip_then_grow_and_save_again(clip_like, built, tmp_path: Path) -> None:
    ids, vectors, queries = clip_like
    built.remove(ids[:10])
    before = built.search(queries, K)
    folder = built.save(tmp_path / "idx")
    opened = open_index(folder)  # found by its manifest, as `search --index` opens it
    assert isinstance(opened, scann_index.ScannIndex) and opened.meta == built.meta and len(opened) == N - 10
    assert isinstance(opened._vectors, np.memmap) and opened.ids() == built.ids()
    after = opened.search(queries, K)
    assert after[0] == before[0] and np.allclose(after[1], before[1])
    opened.add(ids[:10], vectors[:10])
    opened.save(folder)
    again = open_scann(folder)
    assert len(again) == N and again.search(queries, K)[0] == opened.search(queries, K)[0]
    assert len(list(folder.iterdir())) == 4  # the manifest and one generation of data


def test_a_save_that_fails_leaves_the_previous_index_whole(clip_like, tmp_path: Path, monkeypatch) -> None:
    ids, vectors, _ = clip_like
    folder = build_scann(ids[:100], vectors[:100]).save(tmp_path / "idx")
    real = scann_index.atomic_write

    def fail_on_manifest(target: Path, write) -> None:
        if Path(target).name == scann_index.MANIFEST:
            raise OSError(28, "No space left on device")
        real(target, write)

    monkeypatch.setattr(scann_index, "atomic_write", fail_on_manifest)
    with pytest.raises(OSError):
        build_scann(ids[:200], vectors[:200]).save(folder)
    monkeypatch.undo()
    assert len(open_scann(folder)) == 100


def test_a_damaged_index_is_a_clear_error(clip_like, tmp_path: Path) -> None:
    ids, vectors, _ = clip_like
    folder = build_scann(ids[:100], vectors[:100]).save(tmp_path / "idx")
    next(folder.glob("vectors-*.npy")).unlink()
    with pytest.raises(DataError, match=r"is missing vectors-.*\.npy; build it again with build_scann\(") as e:
        open_scann(folder)
    assert cli_message(e.value).endswith("build it again with clip-finetune index --method scann ...")  # the CLI's
    (folder / "scann.json").write_text("{not json")
    with pytest.raises(DataError, match="scann.json' is not a whole manifest"):
        open_scann(folder)
    with pytest.raises(DataError, match="search_share in"):
        ScannSettings(search_share=0)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_model_config: Path) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("scann_cli")
    table = write_csv(root / "pairs.csv", 30, seed=5)
    sets = set_args({**TINY_TRAINING, "model_name": tiny_model_config})
    store = root / "images.npz"
    assert main(["embed", "--images", str(table.parent / "images"), "--out", str(store), *sets]) == 0
    return store, sets, [line.split(",")[-1] for line in table.read_text().splitlines()[1:3]]


def test_index_methods_answer_as_the_exact_search_and_say_which(embedded, tmp_path: Path, capsys) -> None:
    store, sets, captions = embedded
    assert main(["search", "--index", str(store), "-k", "5", *sets, *captions]) == 0
    exact = capsys.readouterr().out
    folder = tmp_path / "idx"
    for method, says in (("scann", "(ScaNN, every vector scored"), ("hnsw", "(usearch HNSW, i8 graph")):
        assert main(["index", "--method", method, "--embeddings", str(store), "--out", str(folder)]) == 0
        assert "indexed 30 vectors of 64 dimensions" in capsys.readouterr().out
        assert main(["search", "--index", str(folder), "-k", "5", *sets, *captions]) == 0
        answer = capsys.readouterr()
        assert f"answered by the approximate index {says}" in answer.err and answer.out == exact
        assert len([p for p in folder.iterdir() if p.suffix == ".json"]) == 1  # the other method's index is gone


def test_a_process_that_opened_an_hnsw_index_first_can_still_build_and_open_a_scann_one(tmp_path: Path) -> None:
    """usearch's extension loaded before ScaNN's made a later ScaNN build or open crash the process (segmentation
    fault): ann._usearch loads ScaNN's first. A fresh process, since this one has both loaded already."""
    import subprocess
    import sys

    script = """if True:
        import sys
        from pathlib import Path
        import numpy as np
        from adapters.clip_finetune.retrieval.ann import build_ann
        from adapters.clip_finetune.retrieval.scann_index import build_scann, open_scann
        v = np.random.default_rng(0).standard_normal((6000, 32)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = [str(i) for i in range(len(v))]
        build_ann(ids[:200], v[:200])  # usearch first
        opened = open_scann(build_scann(ids, v).save(Path(sys.argv[1]) / "idx"))
        print(len(opened), opened.search(v[:1], 3)[0][0][0])
    """
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["6000", "0"]
