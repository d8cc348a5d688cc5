"""Honest splits (load_splits): a held-out split when no validation data is given, grouped so no image or caption
straddles it; a test split; validation/test pairs also in train dropped and counted; exact duplicates dropped;
labelled images (Dataloop annotations, a label column, a folder per class) captioned by a template."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
from helpers import add_item, image_bytes, oid

from adapters.clip_finetune.config import build_config
from adapters.clip_finetune.data.identity import content_key, normalise_caption
from adapters.clip_finetune.data.labels import label_leaf
from adapters.clip_finetune.data.load import load_dataset, load_splits
from adapters.clip_finetune.data.split import SplitOptions
from adapters.clip_finetune.data.synthetic import render, sample_specs, write_dataloop_download
from adapters.clip_finetune.errors import DataError


def _table(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    """300 pairs: 150 photos with two captions each, titles repeating across photos ('red circle')."""
    root = tmp_path_factory.mktemp("catalogue")
    rows = []
    for i, spec in enumerate(sample_specs(150, seed=11)):
        render(spec).save(root / f"{i:03d}.png")
        title = f"{spec.attributes['colour']} {spec.attributes['shape']}"
        rows += [{"filepath": f"{i:03d}.png", "caption": spec.caption}, {"filepath": f"{i:03d}.png", "caption": title}]
    return _table(root / "pairs.csv", rows)


def test_without_validation_data_a_grouped_seeded_split_is_held_out_and_said(catalogue, caplog) -> None:
    with caplog.at_level(logging.INFO):
        splits = load_splits(catalogue, cfg=SplitOptions(seed=3))
    train, held = splits.train, splits.validation
    assert splits.held_out and 20 <= len(held) <= 30 and len(train) + len(held) == 300
    # no image (by content) and no caption (normalised) on both sides
    assert not {content_key(p.image) for p in train} & {content_key(p.image) for p in held}
    assert not {normalise_caption(p.caption) for p in train} & {normalise_caption(p.caption) for p in held}
    report = splits.report_dict()
    assert report["validation"]["used"] == len(held) and report["train"]["used"] == len(train)
    assert report["validation"]["note"].startswith(f"held out from train: {len(held)} of 300 pairs")
    assert "no validation data: held out from train" in caplog.text
    again = load_splits(catalogue, cfg=SplitOptions(seed=3)).validation
    assert again == held and load_splits(catalogue, cfg=SplitOptions(seed=4)).validation != held


@pytest.mark.parametrize(("opts", "held"), [(SplitOptions(holdout_fraction=0), None),
                                            (SplitOptions(holdout_max_pairs=12), 12)], ids=["off", "bounded"])
def test_the_held_out_split_is_configurable_and_bounded(catalogue, opts, held) -> None:
    validation = load_splits(catalogue, cfg=opts).validation
    assert (validation and len(validation)) == held or (validation is None and held is None)


def test_too_little_data_is_not_held_out_and_the_log_says_so(tmp_path, caplog) -> None:
    table = _table(tmp_path / "t.csv", [{"filepath": "x.png", "caption": f"caption {i}"} for i in range(40)])
    render(sample_specs(1, 0)[0]).save(tmp_path / "x.png")
    with caplog.at_level(logging.WARNING):
        splits = load_splits(table, cfg=build_config({"model_name": "RN50", "pretrained": None}))
    assert splits.validation is None and "too few to hold out" in caplog.text


def _download_with_leaks(root: Path) -> Path:
    """train/ and validation/ where validation holds an item also tagged train (same id, same file), a copy of
    a train photo uploaded again (new id and path, same bytes), and two good items."""
    specs = sample_specs(6, seed=12)
    photos = [image_bytes(render(s)) for s in specs]
    for i in range(4):
        add_item(root / "train", oid(i), f"/t/{i}.png", photos[i], description=specs[i].caption)
    add_item(root / "validation", oid(0), "/t/0.png", photos[0], description=specs[0].caption)  # tagged both
    add_item(root / "validation", oid(50), "/v/again.png", photos[1], description="uploaded twice")
    for i in (4, 5):
        add_item(root / "validation", oid(i), f"/v/{i}.png", photos[i], description=specs[i].caption)
    return root


def test_validation_pairs_also_in_train_are_dropped_counted_and_warned(tmp_path, caplog) -> None:
    data = _download_with_leaks(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        splits = load_splits(data)
    assert [p.item_id for p in splits.validation] == [oid(4), oid(5)]
    report = splits.report_dict()["validation"]
    assert report["used"] == 2
    assert report["skipped"] == {"also in train (item id)": 1, "also in train (image content)": 1}
    assert report["examples"]["also in train (image content)"] == [oid(50)]
    assert "validation: 2 pairs are also in train (1 by item id, 1 by image content)" in caplog.text


def test_overlap_by_path_and_keeping_it_when_asked(tmp_path) -> None:
    photos = [str(tmp_path / f"{i}.png") for i in range(3)]
    for spec, path in zip(sample_specs(3, 13), photos, strict=True):
        render(spec).save(path)
    train = _table(tmp_path / "train.csv", [{"image": p, "caption": f"c{i}"} for i, p in enumerate(photos)])
    val = _table(tmp_path / "val.csv", [{"image": photos[0], "caption": "another caption"}])
    with pytest.raises(DataError, match=r"validation: all 1 pairs are also in train .* drop_train_overlap"):
        load_splits(train, val)
    kept = load_splits(train, val, cfg=SplitOptions(drop_train_overlap=False))
    assert len(kept.validation) == 1
    assert kept.report_dict()["validation"]["note"] == "1 pairs also in train (1 by image path), kept"


def test_exact_duplicate_pairs_are_dropped_and_counted(tmp_path) -> None:
    photo = tmp_path / "p.png"
    render(sample_specs(1, 14)[0]).save(photo)
    shutil.copy(photo, tmp_path / "copy.png")
    rows = [{"id": "a", "image": "p.png", "caption": "A red circle"},
            {"id": "b", "image": "p.png", "caption": "a red circle."},
            {"id": "c", "image": "copy.png", "caption": "a red circle"},
            {"id": "d", "image": "p.png", "caption": "other"}]
    splits = load_splits(_table(tmp_path / "t.csv", rows))
    assert [p.item_id for p in splits.train] == ["a", "d"]
    assert splits.report_dict()["train"] == {"used": 2, "skipped": {"duplicate pair": 2}, "examples": {
        "duplicate pair": ["b", "c"]}}


def test_a_test_subset_and_a_test_path_are_read_and_guarded(tmp_path) -> None:
    data = write_dataloop_download(tmp_path / "data", 16, 8, seed=15)
    other = write_dataloop_download(tmp_path / "other", 0, 5, seed=16) / "validation"
    shutil.copytree(other, data / "test")
    splits = load_splits(data)
    assert len(splits.test) == 5 and len(splits.validation) == 8 and not splits.held_out
    assert len(load_splits(data, test=other).test) == 5
    # the same items as validation, which chose the epoch: not an unseen test split (issue 24)
    with pytest.raises(DataError, match="test: all 8 pairs are also in validation"):
        load_splits(data, test=data / "validation")
    with pytest.raises(DataError, match="test: all 16 pairs are also in train"):
        load_splits(data, test=data / "train")


# --------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize(("label", "leaf"), [("vehicle.car", "car"), ("traffic_light", "traffic light"),
                                             (" dog ", "dog"), ("a.b.c.", "c"), (None, "")])
def test_a_hierarchical_label_counts_by_its_leaf(label, leaf) -> None:
    assert label_leaf(label) == leaf


def test_dataloop_items_with_labels_and_no_description_get_template_captions(tmp_path) -> None:
    subset = tmp_path / "train"
    png = image_bytes(render(sample_specs(1, 17)[0]))
    add_item(subset, oid(1), "/a.png", png, annotations=[{"type": "class", "label": "animal.dog"}])
    add_item(subset, oid(2), "/b.png", png + b"\0", annotations=[  # two objects: a pair per distinct label
        {"type": "box", "label": "vehicle.car"}, {"type": "polygon", "label": "person"},
        {"type": "box", "label": "vehicle.car"}, {"type": "text", "label": "free-text", "coordinates": "x"}])
    add_item(subset, oid(3), "/c.png", png + b"\0\0", description="a dog on a sofa",
             annotations=[{"type": "class", "label": "dog"}])
    add_item(subset, oid(4), "/d.png", png + b"\0\0\0")  # neither description nor label
    pairs, reports = load_dataset(subset, label_template="an image of a {label}")
    got = sorted((p.item_id, p.caption, p.label, p.templated) for p in pairs["train"])
    assert got == [(oid(1), "an image of a dog", "dog", True), (oid(2), "an image of a car", "car", True),
                   (oid(2), "an image of a person", "person", True), (oid(3), "a dog on a sofa", "dog", False)]
    assert dict(reports["train"].skipped) == {"no caption": 1}


def test_a_table_with_a_label_column_and_a_folder_per_class(tmp_path) -> None:
    render(sample_specs(1, 18)[0]).save(tmp_path / "x.png")
    table = _table(tmp_path / "t.csv", [{"image": "x.png", "label": "animals.cat", "caption": ""},
                                        {"image": "x.png", "label": "dog", "caption": "a dog, really"},
                                        {"image": "x.png", "label": "", "caption": ""}])
    pairs, reports = load_dataset(table)
    assert [(p.caption, p.label) for p in pairs["train"]] == [("a photo of a cat.", "cat"), ("a dog, really", "dog")]
    assert dict(reports["train"].skipped) == {"no caption or label": 1}
    specs = iter(sample_specs(12, seed=19))
    for split in ("train", "validation"):
        for cls in ("cat", "dog"):
            (tmp_path / "folders" / split / cls).mkdir(parents=True)
            for i in range(3):
                render(next(specs)).save(tmp_path / "folders" / split / cls / f"{i}.jpg")
    splits = load_splits(tmp_path / "folders")
    assert len(splits.train) == 6 and len(splits.validation) == 6
    assert {(p.label, p.caption) for p in splits.validation} == {("cat", "a photo of a cat."),
                                                                 ("dog", "a photo of a dog.")}
    assert json.dumps(splits.report_dict())  # what data_report.json holds
