"""Text search (retrieval/search.py and `clip-finetune search`): queries embedded by the model, ranked by the
index open_index picks, which the command names on stderr while stdout keeps the results alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_MODEL, TINY_TRAINING

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.errors import DataError
from adapters.clip_finetune.model.clip import load_model, save_artifact
from adapters.clip_finetune.retrieval.embed import encode_texts
from adapters.clip_finetune.retrieval.exact_index import ExactIndex
from adapters.clip_finetune.retrieval.provenance import made_by
from adapters.clip_finetune.retrieval.search import search_texts

TEXTS = ["a red circle on the left", "a blue square at the top", "a green ring in the middle"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    clip = load_model(cfg, "cpu")
    return clip, save_artifact(clip, tmp_path_factory.mktemp("model"), cfg)


def test_search_texts_ranks_through_the_index(model) -> None:
    clip, _ = model
    index = ExactIndex(clip.embed_dim, made_by(clip, "texts"))
    index.add(TEXTS, encode_texts(clip, TEXTS))
    hits = search_texts(clip, index, ["a blue square at the top", "a green ring in the middle"], k=2)
    assert [h[0][0] for h in hits] == ["a blue square at the top", "a green ring in the middle"]
    for h in hits:
        assert len(h) == 2 and h[0][1] == pytest.approx(1.0, abs=1e-5) and h[0][1] >= h[1][1]
    with pytest.raises(DataError, match="64-d"):
        search_texts(clip, ExactIndex(8), ["q"], 1)


def test_the_command_names_the_index_that_answered_on_stderr(model, tmp_path: Path, capsys) -> None:
    clip, folder = model
    index = ExactIndex(clip.embed_dim, made_by(clip, "images"))  # texts, labelled images: only the ranking matters
    index.add(TEXTS, encode_texts(clip, TEXTS))
    path = index.save(tmp_path / "index.npz")
    assert main(["search", "--model", str(folder), "--index", str(path), "-k", "1", "a red circle on the left"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["a red circle on the left", out.splitlines()[1]]
    assert out.splitlines()[1].endswith("a red circle on the left")
    assert "answered by the exact index (3 vectors, every one scored)" in err
