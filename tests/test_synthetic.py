"""The synthetic caption data: deterministic, truthful, and readable by the project's own readers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from adapters.clip_finetune.data import synthetic
from adapters.clip_finetune.data.dataloop import read_subset
from adapters.clip_finetune.data.images import load_image
from adapters.clip_finetune.data.load import load_dataset
from adapters.clip_finetune.data.pairs import DataReport
from adapters.clip_finetune.data.synthetic import (
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    VOCABULARY,
    render,
    sample_specs,
    synthetic_resolver,
    write_csv,
    write_dataloop_download,
)
from adapters.clip_finetune.data.tables import read_table


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    a, b = sample_specs(50, seed=3, captions_per_image=2), sample_specs(50, seed=3, captions_per_image=2)
    assert a == b
    assert [s.caption for s in a] != [s.caption for s in sample_specs(50, seed=4)]
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))
    for name in ("x", "y"):
        write_dataloop_download(tmp_path / name, 6, 3, seed=5, prompt_items=True, captions_per_image=2)
    x, y = _files(tmp_path / "x"), _files(tmp_path / "y")
    assert x == y and len(x) == 2 * 9 + 9 + 1  # items/ + json/ per item, the images, their index
    z = _files(write_dataloop_download(tmp_path / "z", 6, 3, seed=6, prompt_items=True, captions_per_image=2))
    assert z != x


def test_images_differ_even_for_equal_attributes() -> None:
    samples = sample_specs(400, seed=0)
    by_attrs: dict[tuple, list] = {}
    for s in samples:
        by_attrs.setdefault(tuple(s.attributes.values()), []).append(s)
    twins = next(group for group in by_attrs.values() if len(group) > 1)
    assert not np.array_equal(np.asarray(render(twins[0])), np.asarray(render(twins[1])))
    assert len(by_attrs) > 300  # 1600 combinations: few repeats, so held-out images are not copies


def _mentioned(caption: str, attribute: str) -> set[str]:
    """The values of `attribute` whose words appear in the caption."""
    words = set(re.findall(r"[a-z]+", caption))
    return {value for value, vocab in VOCABULARY[attribute].items() if words & set(vocab)}


def test_captions_only_name_the_true_attributes() -> None:
    samples = sample_specs(300, seed=1, captions_per_image=3)
    mentions = dict.fromkeys(ATTRIBUTES, 0)
    for s in samples:
        assert len(set(s.captions)) == 3 and s.caption == s.captions[0]
        for caption in s.captions:
            for attr in ATTRIBUTES:
                named = _mentioned(caption, attr)
                assert named <= {s.attributes[attr]}, (caption, attr, s.attributes)
                mentions[attr] += bool(named)
            assert _mentioned(caption, "colour") and _mentioned(caption, "shape"), caption
            assert not re.search(r"\ba [aeiou]", caption), caption
    n = 3 * len(samples)
    assert mentions["position"] > 0.6 * n and 0 < mentions["size"] < n and 0 < mentions["background"] < n


def _foreground(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the shape's pixels (far from the border's median colour) and that background colour."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels - background, axis=-1) > 60, background


def test_rendered_pixels_match_the_attributes() -> None:
    """Colour, position, size and hollowness measured on the pixels agree with the sample's attributes."""
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), dtype=float)
    centres = {p: np.array(xy) * 64 for p, xy in POSITIONS.items()}
    areas: dict[str, list[int]] = {"small": [], "large": []}
    for s in sample_specs(150, seed=2):
        a = s.attributes
        pixels = np.asarray(render(s, size=64), dtype=float)
        mask, background = _foreground(pixels)
        colour = pixels[mask].mean(axis=0)
        assert names[np.argmin(np.linalg.norm(palette - colour, axis=1))] == a["colour"], a
        ys, xs = np.nonzero(mask)
        centroid = np.array([xs.mean(), ys.mean()])
        assert min(centres, key=lambda p: np.linalg.norm(centres[p] - centroid)) == a["position"], a
        cx, cy = np.round(centroid).astype(int)
        assert (not mask[cy - 1:cy + 2, cx - 1:cx + 2].any()) == (a["shape"] == "ring"), a
        areas[a["size"]].append(int(mask.sum()))
    assert max(areas["small"]) < min(areas["large"])


def test_plain_download_reads_back_with_the_right_counts(tmp_path: Path) -> None:
    root = write_dataloop_download(tmp_path, n_train=12, n_validation=5, seed=7, captions_per_image=3)
    splits, reports = load_dataset(root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "validation": 5}
    assert all(r.total_skipped == 0 for r in reports.values())
    assert [p.caption for p in splits["train"] + splits["validation"]] == [s.caption for s in sample_specs(17, 7)]
    record = json.loads(next((root / "train" / "json").rglob("*.json")).read_text())
    assert {"id", "datasetId", "filename", "dir", "name", "type", "hidden", "description", "metadata",
            "annotated", "annotations"} <= set(record)
    assert re.fullmatch(r"[0-9a-f]{24}", record["id"]) and record["filename"].startswith("/synthetic/")
    assert record["metadata"]["system"]["mimetype"] == "image/png"
    image = load_image(splits["train"][0].image)
    assert image.size == (64, 64) and image.size == (record["metadata"]["system"]["width"],) * 2


def test_prompt_download_needs_the_resolver(tmp_path: Path) -> None:
    root = write_dataloop_download(tmp_path, n_train=6, n_validation=3, seed=8, prompt_items=True,
                                   captions_per_image=2)
    assert not list((root / "train").rglob("*.png"))  # images live outside the subset, as on the platform
    calls: list[list[str]] = []
    resolve = synthetic_resolver(root)

    def recording(refs: list[str]) -> dict[str, str]:
        calls.append(refs)
        return resolve(refs)

    splits, reports = load_dataset(root, resolver=recording)
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "validation": 6}
    assert [len(refs) for refs in calls] == [6, 3]  # one bulk call per subset, one ref per image
    assert all(r.total_skipped == 0 for r in reports.values())
    train = splits["train"]
    assert len({p.image for p in train}) == 6  # two captions per image
    specs = sample_specs(9, 8, captions_per_image=2)
    assert sorted(p.caption for p in train) == sorted(c for s in specs[:6] for c in s.captions)
    assert all(p.image.startswith(str(root / "_images")) for p in train)

    report = DataReport()
    assert read_subset(root / "train", report=report) == []
    assert dict(report.skipped) == {"prompt image not found": 12}


@pytest.mark.parametrize(("name", "delimiter"), [("t.csv", ","), ("t.csv", ";"), ("t.tsv", "\t")])
def test_csv_reads_back(tmp_path: Path, name: str, delimiter: str) -> None:
    table = write_csv(tmp_path / "sub" / name, n=10, seed=9, delimiter=delimiter)
    report = DataReport()
    pairs = read_table(table, report)
    assert report.total_skipped == 0
    assert [p.caption for p in pairs] == [s.caption for s in sample_specs(10, 9)]
    assert all(Path(p.image).parent == tmp_path / "sub" / "images" for p in pairs)
    assert np.array_equal(np.asarray(load_image(pairs[3].image)), np.asarray(render(sample_specs(10, 9)[3])))


def test_module_constants_describe_the_design() -> None:
    assert synthetic.N_COMBINATIONS == 8 * 5 * 2 * 5 * 4 == 1600
