"""The leakage guard's perceptual check (leakage_picture_distance): the same picture re-encoded or resized is found
in train although its bytes differ; a different picture is not; without imagehash the option is a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.pairs import CaptionPair, DataReport
from adapters.clip_finetune.data.split import SplitOptions, drop_train_overlap
from adapters.clip_finetune.errors import ConfigError
from bench.perceptual import copies, scene


def _pairs(tmp_path: Path) -> tuple[list[CaptionPair], list[CaptionPair]]:
    rng = np.random.default_rng(5)
    train = []
    for i in range(6):
        scene(rng).save(tmp_path / f"train{i}.png")
        train.append(CaptionPair(str(tmp_path / f"train{i}.png"), f"train picture {i}", f"t{i}"))
    copy = copies(scene(np.random.default_rng(5)))["jpeg q90 3/4 size"]  # train0, re-encoded and resized
    copy.save(tmp_path / "copy.jpg")
    scene(rng).save(tmp_path / "other.png")
    validation = [CaptionPair(str(tmp_path / "copy.jpg"), "a copy", "v0"),
                  CaptionPair(str(tmp_path / "other.png"), "another picture", "v1")]
    return train, validation


def test_the_same_picture_re_encoded_and_resized_counts_as_in_train(tmp_path: Path) -> None:
    pytest.importorskip("imagehash")
    train, validation = _pairs(tmp_path)
    by_bytes = drop_train_overlap("validation", train, validation, DataReport(used=2))
    assert [p.item_id for p in by_bytes] == ["v0", "v1"]  # the bytes differ: not caught without the option
    report = DataReport(used=2)
    kept = drop_train_overlap("validation", train, validation, report, picture_distance=4)
    assert [p.item_id for p in kept] == ["v1"]
    assert report.skipped == {"also in train (same picture)": 1} and report.used == 1


def test_the_option_reaches_the_guard_and_needs_imagehash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = build_config({"leakage_picture_distance": 4})
    assert SplitOptions.of(cfg).picture_distance == 4
    with pytest.raises(ConfigError, match="leakage_picture_distance"):
        build_config({"leakage_picture_distance": 65})
    monkeypatch.setitem(sys.modules, "imagehash", None)  # not installed
    train, validation = _pairs(tmp_path)
    with pytest.raises(ConfigError, match=r"the perceptual check needs imagehash; pip install imagehash"):
        drop_train_overlap("validation", train, validation, DataReport(used=2), picture_distance=4)
