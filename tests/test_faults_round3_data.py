"""Data that was silently wrong (issue 24): class folders per split under other spellings, class names that clean to
nothing, table ids numbered per file, a test split copied from validation, training images that all fail to
decode, and captions that are all the same."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from helpers import TINY_TRAINING, png_bytes

import adapters.clip_finetune.training.loop as loop
from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.identity import linked_groups
from adapters.clip_finetune.data.load import Splits, load_dataset, load_splits
from adapters.clip_finetune.data.pairs import CaptionPair
from adapters.clip_finetune.data.split import SplitOptions
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.errors import DataError
from adapters.clip_finetune.training import finetune


def _class_images(folder: Path, names: list[str], per_class: int, seed: int) -> None:
    specs = iter(sample_specs(len(names) * per_class, seed))
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(next(specs)).save(folder / name / f"{i}.png")


@pytest.mark.parametrize(("train", "validation"), [("Train", "Validation"), ("train", "val"), ("TRAINING", "dev")])
def test_class_folders_under_any_split_spelling_are_splits_not_classes(tmp_path, train, validation) -> None:
    _class_images(tmp_path / train, ["cat", "dog"], 3, 1)
    _class_images(tmp_path / validation, ["cat", "dog"], 2, 2)
    splits = load_splits(tmp_path)
    assert len(splits.train) == 6 and len(splits.validation) == 4 and not splits.held_out
    assert all(f"/{train}/" in p.image for p in splits.train)
    assert all(f"/{validation}/" in p.image for p in splits.validation)


def test_class_folders_for_validation_without_train_are_refused(tmp_path) -> None:
    _class_images(tmp_path / "Validation", ["cat", "dog"], 2, 3)
    _class_images(tmp_path / "test", ["cat", "dog"], 2, 4)
    with pytest.raises(DataError, match=r"holds Validation/, test/ .* but no train/"):
        load_dataset(tmp_path)


def test_class_folders_whose_names_clean_to_nothing_are_counted(tmp_path) -> None:
    _class_images(tmp_path, ["cat", "...", "___"], 2, 5)
    subsets, reports = load_dataset(tmp_path)
    assert [p.label for p in subsets["train"]] == ["cat", "cat"]
    assert reports["train"].skipped == {"class folder name is no label": 4}
    assert reports["train"].examples["class folder name is no label"][0].startswith(("...", "___"))


def _table(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_table_ids_are_scoped_to_their_file(tmp_path) -> None:
    specs = sample_specs(12, 6)
    for i, spec in enumerate(specs):
        render(spec).save(tmp_path / f"{i}.png")
    train = _table(tmp_path / "train.csv", [{"id": str(n + 1), "image": f"{n}.png", "caption": f"train {n}"}
                                            for n in range(8)])
    val = _table(tmp_path / "val.csv", [{"id": str(n + 1), "image": f"{n + 8}.png", "caption": f"val {n}"}
                                        for n in range(4)])
    splits = load_splits(train, val)
    assert len(splits.validation) == 4 and splits.report("validation").total_skipped == 0
    assert [p.item_id for p in splits.validation] == ["1", "2", "3", "4"]  # reports still show the ids as given
    # one id twice in one table is still one item (linked: held-out splits move them together)
    same = _table(tmp_path / "same.csv", [{"id": "7", "image": "0.png", "caption": "one"},
                                          {"id": "7", "image": "1.png", "caption": "two"},
                                          {"id": "8", "image": "2.png", "caption": "three"}])
    groups = linked_groups(load_dataset(same)[0]["train"]).tolist()
    assert groups[0] == groups[1] != groups[2]
    # a validation row that is a training row (its image) is still dropped
    leak = _table(tmp_path / "leak.csv", [{"id": "1", "image": "0.png", "caption": "another"},
                                          {"id": "2", "image": "9.png", "caption": "fine"}])
    leaked = load_splits(train, leak)
    assert len(leaked.validation) == 1 and leaked.report("validation").skipped == {"also in train (image path)": 1}


def test_a_test_split_copied_from_validation_is_refused_and_a_partial_copy_dropped(tmp_path) -> None:
    _test_copied_from_validation(tmp_path)


def _test_copied_from_validation(tmp_path: Path) -> Splits:
    specs = sample_specs(14, 7)
    for i, spec in enumerate(specs):
        render(spec).save(tmp_path / f"{i}.png")
    train = _table(tmp_path / "train.csv", [{"image": f"{n}.png", "caption": f"t {n}"} for n in range(8)])
    val = _table(tmp_path / "val.csv", [{"image": f"{n}.png", "caption": f"v {n}"} for n in range(8, 11)])
    copied = tmp_path / "copied"
    copied.mkdir()
    for n in range(8, 11):  # the same pictures under other names: caught by content
        (copied / f"{n}.png").write_bytes((tmp_path / f"{n}.png").read_bytes())
    same = _table(tmp_path / "test.csv", [{"image": f"copied/{n}.png", "caption": f"v {n}"} for n in range(8, 11)])
    with pytest.raises(DataError, match="test: all 3 pairs are also in validation"):
        load_splits(train, val, test=same)
    partial = _table(tmp_path / "test2.csv", [{"image": "copied/8.png", "caption": "x"},
                                              *({"image": f"{n}.png", "caption": f"x {n}"} for n in range(11, 14))])
    splits = load_splits(train, val, test=partial)
    assert len(splits.test) == 3
    assert splits.report_dict()["test"]["skipped"] == {"also in validation (image content)": 1}
    kept = load_splits(train, val, test=partial, cfg=SplitOptions(drop_train_overlap=False))
    assert len(kept.test) == 4 and "also in validation" in kept.report_dict()["test"]["note"]
    return kept


def test_a_test_split_kept_with_validation_pairs_is_not_said_to_be_unseen(cfg, tmp_path, caplog) -> None:
    kept = _test_copied_from_validation(tmp_path)
    with caplog.at_level(logging.WARNING):
        notes = loop._notes(cfg, kept, 10)
    assert any(n.startswith("only part of the test split is unseen (1 pairs also in validation") for n in notes)
    assert any("only part of the test split" in r.getMessage() for r in caplog.records)


@pytest.fixture
def cfg(tiny_model_config: Path):
    return build_config({**TINY_TRAINING, "num_epochs": 1, "train_batch_size": 4, "batch_size": 8,
                         "base_eval_cache": False}, {"model_name": str(tiny_model_config)})


def test_every_training_image_undecodable_is_an_error_not_a_model(cfg, tmp_path) -> None:
    train = []
    for i in range(8):
        path = tmp_path / f"broken{i}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " + bytes([i]))
        train.append(CaptionPair(str(path), f"caption {i}"))
    with pytest.raises(DataError, match=r"train: none of the 8 training images .* could be decoded .*broken0\.jpg"):
        finetune(cfg, Splits(train), progress=False)


def test_all_identical_captions_are_warned_about(cfg, tmp_path, caplog) -> None:
    pairs = []
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)] * 2):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png_bytes(colour, (8 + i, 6)))
        pairs.append(CaptionPair(str(path), "A photo." if i % 2 else "a photo"))
    with caplog.at_level(logging.WARNING):
        result = finetune(cfg, Splits(pairs), progress=False)
    assert any("only one distinct caption in the 8 training pairs" in n for n in result.notes)
    assert any("only one distinct caption" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
