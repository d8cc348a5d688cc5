"""The approximate index (retrieval/ann.py): recall against brute force on CLIP-like vectors (clusters on a cone,
text queries across a modality gap: bench/clip_like.py), add/remove/replace without a rebuild, an atomic save that
round-trips, the provenance refusal, and `clip-finetune index` + `search --index FOLDER`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAINING, set_args

# found, not imported: usearch's extension must load after ScaNN's (retrieval.ann._usearch sees to it), or a ScaNN index
# later in this process crashes it (tests/test_scann_index.py)
if importlib.util.find_spec("usearch") is None:
    pytest.skip('the approximate index needs usearch: pip install ".[index]"', allow_module_level=True)

from adapters.clip_finetune.cli.advice import cli_message
from adapters.clip_finetune.cli.main import main  # noqa: E402
from adapters.clip_finetune.data.synthetic import write_csv  # noqa: E402
from adapters.clip_finetune.errors import DataError  # noqa: E402
from adapters.clip_finetune.retrieval import ann  # noqa: E402
from adapters.clip_finetune.retrieval.ann import AnnSettings, build_ann, open_ann  # noqa: E402
from adapters.clip_finetune.retrieval.index import Index  # noqa: E402
from adapters.clip_finetune.retrieval.ranking import top_k  # noqa: E402
from adapters.clip_finetune.retrieval.store import load_embeddings, save_embeddings  # noqa: E402
from bench.clip_like import ClipLike  # noqa: E402

N, DIM, K = 6000, 64, 10


@pytest.fixture(scope="module")
def clip_like() -> tuple[list[str], np.ndarray, np.ndarray]:
    """N image-like vectors in clusters and 200 text-like queries from the other side of the gap."""
    gen = ClipLike(DIM, N, seed=1)
    vectors = np.concatenate(list(gen.images()))
    return [f"item-{i}" for i in range(N)], vectors, gen.texts(200)


def _exact(ids: list[str], vectors: np.ndarray, queries: np.ndarray, k: int) -> list[list[str]]:
    rows, _ = top_k(queries @ vectors.T, k)
    return [[ids[r] for r in row] for row in rows]


def _recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("storage", ["i8", "f16"])
def test_recall_against_brute_force_with_exact_scores(clip_like, storage: str) -> None:
    ids, vectors, queries = clip_like
    index = build_ann(ids, vectors, settings=AnnSettings(storage=storage))
    assert isinstance(index, Index) and len(index) == N and index.dim == DIM
    found, scores = index.search(queries, K)
    assert _recall(found, _exact(ids, vectors, queries, K)) >= 0.99
    # the scores are the exact cosines of the full vectors (re-ranked), best first
    row_of = {item: n for n, item in enumerate(ids)}
    exact = np.array([[q @ vectors[row_of[i]] for i in row] for q, row in zip(queries, found, strict=True)])
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 1e-7).all()


def test_without_re_ranking_the_compressed_graph_loses_text_query_recall(clip_like) -> None:
    # why the candidates are re-ranked: i8 distances alone, on queries across the modality gap, rank worse
    ids, vectors, queries = clip_like
    index = build_ann(ids, vectors, settings=AnnSettings(storage="i8", candidates=K))
    graph = index._graph.search(queries, K)
    alone = [[ids[int(r)] for r in row] for row in np.asarray(graph.keys)]
    truth = _exact(ids, vectors, queries, K)
    assert _recall(alone, truth) < _recall(build_ann(ids, vectors).search(queries, K)[0], truth)


def test_add_remove_and_replace_without_a_rebuild(clip_like) -> None:
    ids, vectors, queries = clip_like
    index = build_ann(ids[:4000], vectors[:4000])
    graph = index._graph
    index.add(ids[4000:], vectors[4000:])  # incremental: the same graph grows
    assert index._graph is graph and len(index) == N
    gone = _exact(ids, vectors, queries[:5], 3)[0]
    assert index.remove([*gone, "never-stored"]) == 3 and len(index) == N - 3
    found, _ = index.search(queries, K)
    assert not set(gone) & {i for row in found for i in row}
    kept = [n for n, i in enumerate(ids) if i not in set(gone)]
    assert _recall(found, _exact([ids[n] for n in kept], vectors[kept], queries, K)) >= 0.99
    # replacing: the id moves to its new vector, once; a removed id can come back
    moved = ids[10]
    index.add([moved, gone[0]], queries[:2])
    found, scores = index.search(queries[:2], 1)
    assert found == [[moved], [gone[0]]] and np.allclose(scores, 1.0, atol=1e-5)
    assert index.ids().count(moved) == 1 and len(index) == N - 2 and len(index.ids()) == len(index)


def test_an_id_twice_in_one_add_keeps_the_later_vector(clip_like) -> None:
    _, vectors, _ = clip_like
    index = build_ann(["a", "b", "a"], vectors[:3])
    assert len(index) == 2 and index.search(vectors[2:3], 1)[0] == [["a"]]


def test_save_and_open_round_trip_then_grow_and_save_again(clip_like, tmp_path: Path) -> None:
    ids, vectors, queries = clip_like
    meta = {"kind": "images", "model": "m", "model_sha256": "ab" * 32}
    index = build_ann(ids[:5000], vectors[:5000], meta)
    index.remove(ids[:10])
    before = index.search(queries, K)
    folder = index.save(tmp_path / "idx")
    opened = open_ann(folder)
    assert opened.meta == meta and len(opened) == 4990 and opened.ids() == index.ids()
    assert isinstance(opened._vectors, np.memmap)  # the full vectors stay on disk, read on demand
    after = opened.search(queries, K)
    assert after[0] == before[0] and np.allclose(after[1], before[1])
    opened.add(ids[5000:], vectors[5000:])
    opened.save(folder)
    again = open_ann(folder)
    assert len(again) == N - 10 and again.search(queries, K)[0] == opened.search(queries, K)[0]
    assert len(list(folder.iterdir())) == 4  # the manifest and one generation of data files


def test_a_save_that_fails_leaves_the_previous_index_whole(clip_like, tmp_path: Path, monkeypatch) -> None:
    ids, vectors, queries = clip_like
    folder = build_ann(ids[:1000], vectors[:1000]).save(tmp_path / "idx")
    real = ann.atomic_write

    def fail_on_manifest(target: Path, write) -> None:  # the disk fills as the last file is written
        if Path(target).name == ann.MANIFEST:
            raise OSError(28, "No space left on device")
        real(target, write)

    monkeypatch.setattr(ann, "atomic_write", fail_on_manifest)
    with pytest.raises(OSError):
        build_ann(ids, vectors).save(folder)
    monkeypatch.undo()
    assert len(open_ann(folder)) == 1000


def test_a_damaged_index_is_a_clear_error(clip_like, tmp_path: Path) -> None:
    ids, vectors, _ = clip_like
    folder = build_ann(ids[:500], vectors[:500]).save(tmp_path / "idx")
    with pytest.raises(DataError, match="holds no ann.json: not an index of this tool"):
        open_ann(tmp_path)
    next(folder.glob("vectors-*.npy")).unlink()
    with pytest.raises(DataError, match=r"is missing vectors-.*\.npy; build it again with build_ann\(ids, ") as e:
        open_ann(folder)
    assert cli_message(e.value).endswith("build it again with clip-finetune index --method hnsw ...")  # the CLI's words
    (folder / "ann.json").write_text("{not json")
    with pytest.raises(DataError, match="ann.json' is not readable"):
        open_ann(folder)


def test_wrong_shapes_and_settings_are_refused(clip_like) -> None:
    _, vectors, _ = clip_like
    index = build_ann(["a"], vectors[:1])
    with pytest.raises(DataError, match=r"need \[2, 64\]"):
        index.add(["b", "c"], vectors[:2, :32])
    with pytest.raises(DataError, match="NaN or infinity"):
        index.add(["b"], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(DataError, match="index storage 'i4': use one of i8, f16, f32"):
        AnnSettings(storage="i4")


# --- the command line: index, then search --index FOLDER ------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_model_config: Path) -> tuple[Path, list[str], list[str]]:
    """30 synthetic images embedded by the tiny model (random init) with `clip-finetune embed`."""
    root = tmp_path_factory.mktemp("ann_cli")
    table = write_csv(root / "pairs.csv", 30, seed=5)
    sets = set_args({**TINY_TRAINING, "model_name": tiny_model_config})
    store = root / "images.npz"
    assert main(["embed", "--images", str(table.parent / "images"), "--out", str(store), *sets]) == 0
    captions = [line.split(",")[-1] for line in table.read_text().splitlines()[1:3]]
    return store, sets, captions


def test_index_then_search_answers_as_the_exact_search_and_says_so(embedded, tmp_path: Path, capsys) -> None:
    store, sets, captions = embedded
    folder = tmp_path / "idx"
    assert main(["index", "--method", "hnsw", "--embeddings", str(store), "--out", str(folder)]) == 0
    assert "indexed 30 vectors of 64 dimensions" in capsys.readouterr().out
    assert main(["search", "--index", str(store), "-k", "5", *sets, *captions]) == 0
    exact = capsys.readouterr()
    assert main(["search", "--index", str(folder), "-k", "5", *sets, *captions]) == 0
    approximate = capsys.readouterr()
    assert "answered by the exact index (30 vectors" in exact.err
    assert "answered by the approximate index (usearch HNSW, i8 graph" in approximate.err
    assert approximate.out == exact.out and len(approximate.out.splitlines()) == 2 * 6


def test_search_refuses_an_index_of_another_model(embedded, tmp_path: Path, capsys) -> None:
    store, sets, captions = embedded
    ids, vectors = load_embeddings(store)
    other = save_embeddings(tmp_path / "other.npz", ids, vectors,
                            {"kind": "images", "model": "someone-else", "model_sha256": "0" * 64})
    folder = tmp_path / "idx"
    assert main(["index", "--method", "hnsw", "--embeddings", str(other), "--out", str(folder)]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(folder), *sets, captions[0]]) == 2
    err = capsys.readouterr().err
    assert "embedded by 'someone-else', a model with other weights" in err and "--allow-mismatch" in err
    assert main(["search", "--index", str(folder), "--allow-mismatch", *sets, captions[0]]) == 0


def test_index_refuses_a_folder_of_other_files(embedded, tmp_path: Path, capsys) -> None:
    store, _, _ = embedded
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["index", "--method", "hnsw", "--embeddings", str(store), "--out", str(tmp_path)]) == 2
    assert "holds other files; name a new folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_shards_merged_answer_as_one_index(clip_like) -> None:
    ids, vectors, queries = clip_like
    shards = [build_ann(ids[s::3], vectors[s::3]) for s in range(3)]  # e.g. one per machine
    merged, scores = ann.search_shards(shards, queries, K)
    assert _recall(merged, _exact(ids, vectors, queries, K)) >= 0.99
    # merged by exact scores, best first: each shard's re-ranked cosines compare across shards
    # (not compared with one approximate index of everything: two HNSW graphs built on several threads may each
    # miss a different 1% of the true top 10, so their agreement is no test of the merge)
    stored = dict(zip(ids, vectors, strict=True))
    exact_scores = np.array([[stored[i] @ q for i in row] for row, q in zip(merged, queries, strict=True)])
    assert np.allclose(scores, exact_scores, atol=1e-5) and np.all(np.diff(scores, axis=1) <= 1e-7)


def test_index_settings_are_kept_in_the_index(embedded, tmp_path: Path, capsys) -> None:
    store, _, _ = embedded
    folder = tmp_path / "idx"
    assert main(["index", "--method", "hnsw", "--embeddings", str(store), "--out", str(folder), "--storage", "f16",
                 "--expansion", "64"]) == 0
    opened = open_ann(folder)
    assert opened.settings.storage == "f16" and opened._graph.expansion_search == 64
    assert main(["index", "--method", "hnsw", "--embeddings", str(store), "--out", str(folder), "--connectivity",
                 "0"]) == 2
    assert "index settings {'connectivity': 0}: each must be a whole number >= 1" in capsys.readouterr().err


def test_without_usearch_the_error_says_what_to_install(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "usearch", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(DataError, match=r'needs usearch: pip install -e "\.\[index\]"'):
        ann.AnnIndex(8)
