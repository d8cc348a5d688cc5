"""Readers (data/dataloop.py, data/tables.py, data/load.py) and image decoding (data/images.py), on small files
generated here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    REPO,
    add_item,
    add_prompt_item,
    free_text,
    image_prompt,
    noise_jpeg_bytes,
    oid,
    png_bytes,
    png_declaring,
    stream,
)
from PIL import Image

from adapters.clip_finetune.data.dataloop import read_subset
from adapters.clip_finetune.data.images import (
    PILLOW_MAX_IMAGE_PIXELS,
    ImageDecodeError,
    load_image,
    set_max_image_pixels,
)
from adapters.clip_finetune.data.load import load_dataset, load_splits
from adapters.clip_finetune.data.pairs import DataReport
from adapters.clip_finetune.data.tables import CAPTION_COLUMNS, IMAGE_COLUMNS, read_table
from adapters.clip_finetune.errors import DataError

# --- helpers: resolvers --------------------------------------------------------------------------------------


class RecordingResolver:
    """A resolver that returns files for the refs it knows and records every call."""

    def __init__(self, known: dict[str, str]) -> None:
        self.known = known
        self.calls: list[list[str]] = []

    def __call__(self, refs: list[str]) -> dict[str, str]:
        self.calls.append(list(refs))
        return {r: self.known[r] for r in refs if r in self.known}


def refuse_resolver(refs: list[str]) -> dict[str, str]:
    raise AssertionError(f"resolver must not be called (got {refs})")


# --- plain image items ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"description": "top level"}, "top level"),
        ({"metadata": {"system": {"mimetype": "image/png", "description": "system"}}}, "system"),
        ({"metadata": {"system": {"mimetype": "image/png"}, "description": {"text": "legacy"}}}, "legacy"),
        ({"metadata": {"system": {"mimetype": "image/png"}, "description": "legacy string"}}, "legacy string"),
        ({"description": "  ", "metadata": {"system": {"description": " second "}, "description": {"text": "x"}}},
         "second"),
        ({"description": "", "metadata": {"system": {"description": None}, "description": {"text": "third"}}},
         "third"),
        ({"description": "first", "metadata": {"system": {"description": "no"}, "description": {"text": "no"}}},
         "first"),
    ],
)
def test_caption_comes_from_the_first_nonempty_description(tmp_path: Path, record: dict, expected: str) -> None:
    image = add_item(tmp_path, oid(1), "/dir/a.png", **record)
    [pair] = read_subset(tmp_path)
    assert (pair.image, pair.caption, pair.item_id) == (str(image), expected, oid(1))


def test_items_without_caption_or_file_are_skipped_and_counted(tmp_path: Path) -> None:
    add_item(tmp_path, oid(1), "/a.png", description="kept")
    add_item(tmp_path, oid(2), "/b.png", description="   ")
    add_item(tmp_path, oid(3), "/c.png", content=None, description="file never downloaded")
    add_item(tmp_path, oid(4), "/d.mp4", description="a video", metadata={"system": {"mimetype": "video/mp4"}})
    report = DataReport()
    pairs = read_subset(tmp_path, report=report)
    assert [p.item_id for p in pairs] == [oid(1)]
    assert report.used == 1
    assert dict(report.skipped) == {"no caption": 1, "image file missing": 1, "not an image or prompt item": 1}
    assert report.examples["no caption"] == [oid(2)]
    assert report.examples["image file missing"] == [oid(3)]


def test_unreadable_json_is_skipped(tmp_path: Path) -> None:
    add_item(tmp_path, oid(1), "/a.png", description="ok")
    (tmp_path / "json" / "broken.json").write_text('{"id": "x", ')
    (tmp_path / "json" / "list.json").write_text("[1, 2]")
    report = DataReport()
    assert len(read_subset(tmp_path, report=report)) == 1
    assert report.skipped["unreadable json"] == 2


def test_duplicate_items_are_kept_once(tmp_path: Path) -> None:
    add_item(tmp_path, oid(1), "/a/x.png", description="one")
    add_item(tmp_path, oid(1), "/b/x.png", description="one again")
    report = DataReport()
    pairs = read_subset(tmp_path, report=report)
    assert len(pairs) == 1 and pairs[0].item_id == oid(1)
    assert report.skipped["duplicate item"] == 1


@pytest.mark.parametrize("filename", ["/../../secret.png", "/ok/../../../secret.png", "../secret.png"])
def test_path_traversal_is_refused(tmp_path: Path, filename: str) -> None:
    subset = tmp_path / "data" / "train"
    (subset / "json").mkdir(parents=True)
    (subset / "items").mkdir()
    (tmp_path / "secret.png").write_bytes(b"outside")
    (tmp_path / "data" / "secret.png").write_bytes(b"outside")
    (subset / "json" / "evil.json").write_text(json.dumps({"id": oid(9), "filename": filename, "description": "x"}))
    report = DataReport()
    assert read_subset(subset, report=report) == []
    assert dict(report.skipped) == {"unsafe path": 1}


def test_file_found_by_stem_when_filename_does_not_match(tmp_path: Path) -> None:
    (tmp_path / "items" / "d").mkdir(parents=True)
    (tmp_path / "items" / "d" / "cat.jpg").write_bytes(b"jpeg")
    (tmp_path / "json" / "d").mkdir(parents=True)
    (tmp_path / "json" / "d" / "cat.json").write_text(json.dumps({"id": oid(1), "description": "a cat"}))
    [pair] = read_subset(tmp_path)
    assert pair.image == str(tmp_path / "items" / "d" / "cat.jpg")


def test_missing_subset_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_subset(tmp_path / "nope")


# --- prompt items -----------------------------------------------------------------------------------------


def test_prompts_are_matched_to_their_free_text_by_prompt_id(tmp_path: Path) -> None:
    """Two prompts with images in the download (one by stream URL, one by bare id): no resolver call."""
    cat = add_item(tmp_path, oid(1), "/img/cat.png")  # images without a caption still serve prompts
    dog = add_item(tmp_path, oid(2), "/img/dog.png")
    annotations = [
        free_text("2", "a dog"),
        {"type": "box", "label": "dog", "coordinates": [], "metadata": {"system": {"promptId": "2"}}},
        free_text("9", "belongs to no prompt"),
        free_text("1", "a cat"),
        free_text("1", "a small cat"),  # a second reviewed response: a second caption of the same image
    ]
    add_prompt_item(tmp_path, oid(10), {"1": image_prompt(stream(oid(1))), "2": image_prompt(oid(2))}, annotations)
    report = DataReport()
    pairs = read_subset(tmp_path, resolver=refuse_resolver, report=report)
    assert {(p.image, p.caption, p.item_id) for p in pairs} == {
        (str(cat), "a cat", oid(10)), (str(cat), "a small cat", oid(10)), (str(dog), "a dog", oid(10))}
    assert report.used == 3
    # the two uncaptioned image items are the prompts' images: used through them, not "skipped: no caption"
    assert dict(report.skipped) == {}


def test_an_uncaptioned_image_no_prompt_shows_is_still_skipped(tmp_path: Path) -> None:
    add_item(tmp_path, oid(1), "/img/cat.png")
    add_item(tmp_path, oid(2), "/img/stray.png")
    add_prompt_item(tmp_path, oid(10), {"1": image_prompt(oid(1))}, [free_text("1", "a cat")])
    report = DataReport()
    assert [p.caption for p in read_subset(tmp_path, report=report)] == ["a cat"]
    assert dict(report.skipped) == {"no caption": 1} and report.examples["no caption"] == [oid(2)]


def test_free_text_without_prompt_id_captions_the_first_prompt(tmp_path: Path) -> None:
    """Dataloop's own CLIP adapter takes the first free-text answer; an annotation made without a promptId
    (older prompt items, annotations made by hand) captions the first prompt, in numeric order."""
    cat = add_item(tmp_path, oid(1), "/img/cat.png")
    dog = add_item(tmp_path, oid(2), "/img/dog.png")
    no_id = {"type": "text", "label": "free-text", "coordinates": "a cat on a sofa", "metadata": {"system": {}}}
    add_prompt_item(tmp_path, oid(10), {"10": image_prompt(oid(2)), "2": image_prompt(oid(1))}, [no_id])
    add_prompt_item(tmp_path, oid(11), {"1": image_prompt(oid(2))}, [free_text("1", "a dog"), {**no_id,
                    "coordinates": "a dog"}])  # the same text twice: one caption
    pairs = read_subset(tmp_path, resolver=refuse_resolver)
    assert sorted((p.image, p.caption, p.item_id) for p in pairs) == sorted([
        (str(cat), "a cat on a sofa", oid(10)), (str(dog), "a dog", oid(11))])


def test_prompt_item_recognised_by_content_without_shebang(tmp_path: Path) -> None:
    add_item(tmp_path, oid(1), "/img/cat.png")
    add_prompt_item(tmp_path, oid(10), {"1": image_prompt(oid(1))}, [free_text("1", "a cat")], shebang=False)
    assert [p.caption for p in read_subset(tmp_path)] == ["a cat"]


def test_resolver_is_called_once_with_all_missing_refs(tmp_path: Path) -> None:
    external = "https://example.com/pic.jpg"
    fetched = {oid(1): tmp_path / "fetched1.png", external: tmp_path / "fetched_ext.png"}
    for f in fetched.values():
        f.write_bytes(b"png")
    add_prompt_item(tmp_path / "s", oid(10), {"1": image_prompt(stream(oid(1))), "2": image_prompt(external)},
                    [free_text("1", "one"), free_text("2", "external")])
    add_prompt_item(tmp_path / "s", oid(11), {"1": image_prompt(oid(1)), "2": image_prompt(oid(3))},
                    [free_text("1", "one again"), free_text("2", "never fetched")])
    resolver = RecordingResolver({k: str(v) for k, v in fetched.items()})
    report = DataReport()
    pairs = read_subset(tmp_path / "s", resolver=resolver, report=report)
    assert len(resolver.calls) == 1
    assert sorted(resolver.calls[0]) == sorted([oid(1), external, oid(3)])  # unique ids, stream URL -> id
    assert {(p.caption, p.image) for p in pairs} == {
        ("one", str(fetched[oid(1)])), ("one again", str(fetched[oid(1)])), ("external", str(fetched[external]))}
    assert dict(report.skipped) == {"prompt image not found": 1}
    assert report.examples["prompt image not found"] == [f"{oid(11)}#2"]


def test_unusable_prompts_are_skipped_with_their_reason(tmp_path: Path) -> None:
    add_item(tmp_path, oid(1), "/img/cat.png", description="a cat")
    prompts = {
        "1": [{"mimetype": "application/text", "value": "text only"}],
        "2": image_prompt(oid(1)),  # no annotation for it
        "3": image_prompt(oid(7)),  # an id neither in the download nor known to the resolver
        "4": image_prompt(oid(1)),
    }
    add_prompt_item(tmp_path, oid(10), prompts, [free_text("1", "x"), free_text("3", "y"), free_text("4", "z")])
    add_prompt_item(tmp_path, oid(11), {}, [])
    resolver = RecordingResolver({})
    report = DataReport()
    pairs = read_subset(tmp_path, resolver=resolver, report=report)
    assert sorted(p.caption for p in pairs) == ["a cat", "z"]
    assert dict(report.skipped) == {"prompt has no image": 1, "no free-text annotation": 1,
                                    "prompt image not found": 1, "prompt item has no prompts": 1}
    assert report.examples["no free-text annotation"] == [f"{oid(10)}#2"]
    assert resolver.calls == [[oid(7)]]


def test_without_resolver_missing_prompt_images_are_skipped(tmp_path: Path) -> None:
    add_prompt_item(tmp_path, oid(10), {"1": image_prompt(oid(1))}, [free_text("1", "x")])
    report = DataReport()
    assert read_subset(tmp_path, report=report) == []
    assert dict(report.skipped) == {"prompt image not found": 1}


def test_unreadable_prompt_file_is_skipped(tmp_path: Path) -> None:
    add_item(tmp_path, oid(10), "/p.json", b"{not json", annotations=[free_text("1", "x")],
             metadata={"system": {"mimetype": "application/json", "shebang": {"dltype": "prompt"}}})
    report = DataReport()
    assert read_subset(tmp_path, report=report) == []
    assert dict(report.skipped) == {"unreadable prompt json": 1}


# --- tables -----------------------------------------------------------------------------------------------


def write_table(path: Path, rows: list[dict[str, str]], delimiter: str = ",") -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\nnot json\n")
    else:
        header = list(rows[0])
        lines = [delimiter.join(header)] + [delimiter.join(_quote(r.get(h, ""), delimiter) for h in header)
                                            for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


def _quote(value: str, delimiter: str) -> str:
    return f'"{value}"' if delimiter in value or "," in value else value


@pytest.mark.parametrize(
    ("name", "delimiter", "image_col", "caption_col"),
    [
        ("t.csv", ",", "filepath", "caption"),
        ("t.csv", ";", "Image", "TEXT"),
        ("t.tsv", "\t", "image_path", "title"),
        ("t.jsonl", "", "img", "Description"),
    ],
)
def test_tables(tmp_path: Path, name: str, delimiter: str, image_col: str, caption_col: str) -> None:
    (tmp_path / "imgs").mkdir()
    for f in ("a.png", "b.png"):
        (tmp_path / "imgs" / f).write_bytes(b"png")
    elsewhere = tmp_path / "abs.png"
    elsewhere.write_bytes(b"png")
    rows = [
        {"id": "r1", image_col: "imgs/a.png", caption_col: "a red, round thing"},
        {"id": "", image_col: str(elsewhere), caption_col: "absolute path"},
        {"id": "r3", image_col: "imgs/b.png", caption_col: "  "},
        {"id": "r4", image_col: "imgs/missing.png", caption_col: "no file"},
    ]
    report = DataReport()
    pairs = read_table(write_table(tmp_path / name, rows, delimiter), report)
    assert [(p.image, p.caption, p.item_id) for p in pairs] == [
        (str(tmp_path / "imgs" / "a.png"), "a red, round thing", "r1"),
        (str(elsewhere), "absolute path", "row 2"),
    ]
    expected = {"no caption": 1, "image file missing": 1}
    if name.endswith(".jsonl"):
        expected["unreadable json line"] = 1
    assert dict(report.skipped) == expected and report.used == 2


@pytest.mark.parametrize(
    ("columns", "missing", "accepted"),
    [(["picture", "caption"], "image", IMAGE_COLUMNS), (["path", "words"], "caption", CAPTION_COLUMNS)],
)
def test_table_without_a_known_column_names_what_it_found(
    tmp_path: Path, columns: list[str], missing: str, accepted: tuple[str, ...]
) -> None:
    table = write_table(tmp_path / "t.csv", [dict.fromkeys(columns, "x")])
    with pytest.raises(DataError) as e:
        read_table(table)
    msg = str(e.value)
    assert f"no {missing} column" in msg and all(c in msg for c in columns) and all(a in msg for a in accepted)


def test_table_with_an_unknown_suffix_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match=r"\.xlsx"):
        read_table(tmp_path / "t.xlsx")


# --- load_dataset -----------------------------------------------------------------------------------------


def test_load_dataset_dispatches_on_layout(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"png")
    table = write_table(tmp_path / "t.csv", [{"image": "a.png", "caption": "c"}])
    splits, reports = load_dataset(table)
    assert list(splits) == ["train"] and len(splits["train"]) == 1 and reports["train"].used == 1

    add_item(tmp_path / "one", oid(1), "/a.png", description="c")
    splits, _ = load_dataset(tmp_path / "one")
    assert list(splits) == ["train"] and splits["train"][0].item_id == oid(1)

    for i, name in enumerate(["train", "validation", "holdout"]):
        add_item(tmp_path / "many" / name, oid(i), f"/{name}.png", description=name)
    (tmp_path / "many" / "notes").mkdir()
    splits, reports = load_dataset(tmp_path / "many")
    assert sorted(splits) == ["holdout", "train", "validation"]
    assert all(s[0].caption == name for name, s in splits.items())
    assert set(reports) == set(splits)


def test_load_dataset_passes_the_resolver_to_every_subset(tmp_path: Path) -> None:
    image = tmp_path / "fetched.png"
    image.write_bytes(b"png")
    for name in ("train", "validation"):
        add_prompt_item(tmp_path / "d" / name, oid(10), {"1": image_prompt(oid(1))}, [free_text("1", name)])
    resolver = RecordingResolver({oid(1): str(image)})
    splits, _ = load_dataset(tmp_path / "d", resolver=resolver)
    assert {n: [p.caption for p in s] for n, s in splits.items()} == {"train": ["train"], "validation": ["validation"]}
    assert len(resolver.calls) == 2  # once per subset


@pytest.mark.parametrize("make", ["missing", "empty_dir", "other_dir", "wrong_file"])
def test_load_dataset_explains_the_accepted_layouts(tmp_path: Path, make: str) -> None:
    path = tmp_path / "data"
    if make == "empty_dir":
        path.mkdir()
    elif make == "other_dir":
        (path / "photos").mkdir(parents=True)
    elif make == "wrong_file":
        path = tmp_path / "data.parquet"
        path.write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_dataset(path)
    msg = str(e.value)
    assert str(path) in msg
    assert all(s in msg for s in (".csv/.tsv/.jsonl", "items/ and json/", "train/, validation/"))


def test_core_modules_import_without_dtlpy() -> None:
    code = ("import sys; sys.modules['dtlpy'] = None\n"
            "import adapters.clip_finetune.data.dataloop, adapters.clip_finetune.data.images, "
            "adapters.clip_finetune.data.synthetic")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# --- images.py ----------------------------------------------------------------------------------------------


def _save(image: Image.Image, path: Path, **kw: Any) -> Path:
    image.save(path, **kw)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 12, 12))  # red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    out = load_image(_save(im, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40) and out.mode == "RGB"
    r, g, b = out.getpixel((17, 2))  # after a clockwise turn the top-left corner is top-right
    assert r > 200 and b < 60


def _half_transparent(mode: str) -> Image.Image:
    """8x8, left half fully transparent (its colour is green, which must not show), right half black."""
    if mode == "P":  # palette image: index 1 (green) is the transparent one (PNG tRNS chunk)
        image = Image.new("P", (8, 8), 0)
        image.putpalette([0, 0, 0, 0, 255, 0])
        image.paste(1, (0, 0, 4, 8))
        image.info["transparency"] = 1
        return image
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (0, 0, 4, 8))
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white(tmp_path: Path, mode: str) -> None:
    path = _save(_half_transparent(mode), tmp_path / "t.png")
    assert Image.open(path).mode == mode and (mode != "P" or "transparency" in Image.open(path).info)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((6, 6)) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    out = load_image(_save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    a = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    path = _save(Image.fromarray(a), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (2, 2, 3)
    assert out[..., 0].tolist() == [[0, 255], [128, 4]]


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = _save(frames[0], tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 3
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("truncated.jpg", noise_jpeg_bytes()[:600], "truncated"),
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image\n", "UnidentifiedImageError"),
        ("missing.png", None, "not found"),
    ],
)
def test_undecodable_files_raise_with_the_path(tmp_path: Path, name: str, content: bytes | None, reason: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason) as e:
        load_image(path)
    assert str(path) in str(e.value) and isinstance(e.value, DataError)


@pytest.fixture
def restore_pixel_limit() -> Any:
    yield
    set_max_image_pixels(PILLOW_MAX_IMAGE_PIXELS)


@pytest.mark.parametrize(
    ("declared", "limit"),
    [
        ((100_000, 100_000), None),  # far over Pillow's default: Pillow's own DecompressionBombError
        ((12_000, 10_000), None),  # between 1x and 2x the default: Pillow only warns; refused anyway
        ((20, 20), 300),  # a lowered limit, warning zone (400 pixels <= 2 x 300)
        ((20, 20), 100),  # a lowered limit, error zone
    ],
)
def test_decompression_bombs_are_refused_quickly(
    tmp_path: Path, restore_pixel_limit: None, declared: tuple[int, int], limit: int | None
) -> None:
    if limit is not None:
        set_max_image_pixels(limit)
        path = _save(Image.new("RGB", declared), tmp_path / "small.png")
    else:
        path = tmp_path / "bomb.png"
        path.write_bytes(png_declaring(*declared))
    filters_before = list(warnings.filters)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match="decompression bomb") as e:
            load_image(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(e.value) and "set_max_image_pixels" in str(e.value)
    assert caught == []  # refused, not merely warned about
    assert warnings.filters == filters_before


def test_pixel_limit_can_be_lifted_for_trusted_images(tmp_path: Path, restore_pixel_limit: None) -> None:
    path = _save(Image.new("RGB", (20, 20), (1, 2, 3)), tmp_path / "ok.png")
    set_max_image_pixels(100)
    with pytest.raises(ImageDecodeError):
        load_image(path)
    set_max_image_pixels(None)
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(("train", "validation"), [("train", "validation"), ("training", "val"),
                                                    ("Train", "valid"), ("train", "dev")])
def test_common_subset_spellings_are_the_train_and_validation_splits(tmp_path: Path, train: str,
                                                                     validation: str) -> None:
    for n, (folder, caption) in enumerate(((train, "a red circle"), (validation, "a blue square"))):
        add_item(tmp_path / folder, oid(n + 1), "/a.png", png_bytes((200, 40 * n, 40)), description=caption)
    splits = load_splits(tmp_path)
    assert [p.caption for p in splits.train] == ["a red circle"]
    assert [p.caption for p in splits.validation] == ["a blue square"]
    assert sorted(splits.reports) == ["train", "validation"]


def test_two_spellings_of_one_split_are_refused(tmp_path: Path) -> None:
    for n, folder in enumerate(("train", "training")):
        add_item(tmp_path / folder, oid(n + 1), "/a.png", png_bytes((200, 40 * n, 40)), description="a red circle")
    with pytest.raises(DataError, match=r"two subsets for the 'train' split: train/ and training/"):
        load_splits(tmp_path)


def test_a_separate_validation_table_is_reported_as_validation(tmp_path: Path) -> None:
    train = tmp_path / "train"
    add_item(train, oid(1), "/a.png", png_bytes((200, 0, 0)), description="a red circle")
    add_item(train, oid(2), "/b.png", png_bytes((0, 0, 200)), description="a blue square")
    table = tmp_path / "val.csv"
    image = tmp_path / "c.png"
    image.write_bytes(png_bytes())
    table.write_text(f"image,caption\n{image},a green ring\nmissing.png,a lost one\n")
    splits = load_splits(train, table)
    assert [p.caption for p in splits.validation] == ["a green ring"]
    assert splits.report_dict()["validation"]["skipped"] == {"image file missing": 1}
    assert splits.report_dict()["train"]["used"] == 2
