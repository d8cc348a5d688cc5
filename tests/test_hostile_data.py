"""A corpus of hostile inputs, generated here, in one Dataloop download beside good items: training uses
every good pair, skips each bad one for a named reason, and saves the data report with the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import (
    TINY_TRAINING,
    add_item,
    add_prompt_item,
    deadline,
    free_text,
    image_bytes,
    image_prompt,
    noise_jpeg_bytes,
    oid,
    png_bytes,
    png_declaring,
    set_args,
    stream,
)
from PIL import Image

from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.data.synthetic import write_dataloop_download


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(Image.new("RGB", (40, 20), (200, 0, 0)), "JPEG", exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 0, 255, 0])
    im.info["transparency"] = 1
    return image_bytes(im)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    return image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])


GOOD_IMAGES = {  # name: file content; each decodes to an upright RGB image
    "alpha.png": lambda: image_bytes(Image.new("RGBA", (16, 16), (255, 0, 0, 128))),
    "palette.png": _palette_with_transparency,
    "cmyk.jpg": lambda: image_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
    "gray16.png": lambda: image_bytes(Image.new("I;16", (16, 16), 30000)),
    "animated.gif": _animated_gif,
    "rotated.jpg": _exif_rotated,
    "one-pixel.png": lambda: png_bytes((0, 255, 0), size=(1, 1)),
}
BAD_IMAGES = {  # name: file content; each fails to decode and is skipped while training
    "truncated.jpg": lambda: noise_jpeg_bytes()[:600],
    "zero-byte.jpg": lambda: b"",
    "text-named.jpg": lambda: b"this is a text file, not a JPEG\n",
    "bomb.png": lambda: png_declaring(100_000, 100_000),
}
ODD_CAPTIONS = ["x " * 5000, "красный круг слева", "赤い丸", "🔴 a red circle 🎯"]  # all usable
NO_CAPTIONS = {"empty": "", "blank": "   \n\t", "missing": None}


def build_corpus(subset: Path) -> tuple[int, dict[str, int]]:
    """Add every hostile case to a subset download; return (good pairs added, expected skips per reason)."""
    n = 1000
    good = 0
    for name, content in GOOD_IMAGES.items():
        add_item(subset, oid(n := n + 1), f"/hostile/{name}", content(), description=f"image {name}")
        good += 1
    for name, content in BAD_IMAGES.items():
        add_item(subset, oid(n := n + 1), f"/hostile/{name}", content(), description=f"image {name}")
        good += 1  # readers only check the file is there; the decode failure shows while training
    ok_png = png_bytes((0, 0, 255), size=(8, 8))
    for i, caption in enumerate(ODD_CAPTIONS):
        add_item(subset, oid(n := n + 1), f"/captions/odd-{i}.png", ok_png, description=caption)
        good += 1
    for name, caption in NO_CAPTIONS.items():
        extra = {} if caption is None else {"description": caption}
        add_item(subset, oid(n := n + 1), f"/captions/{name}.png", ok_png, **extra)
    # item JSON: fields missing (no filename: found by stem), and a file that is not JSON at all
    add_item(subset, oid(n := n + 1), "/json/no-fields.png", ok_png, description="a blue square")
    record = subset / "json" / "json" / "no-fields.json"
    record.write_text(json.dumps({"id": oid(n), "description": "a blue square"}))
    good += 1
    (subset / "json" / "json" / "garbage.json").write_text("{not json")
    # prompt items: no image element, an image id that cannot be found, no free-text annotation
    add_prompt_item(subset, oid(n := n + 1), {"1": [{"mimetype": "application/text", "value": "hi"}]},
                    [free_text("1", "a caption")])
    add_prompt_item(subset, oid(n := n + 1), {"1": image_prompt(stream(oid(999_999)))}, [free_text("1", "x")])
    add_prompt_item(subset, oid(n := n + 1), {"1": image_prompt(stream(oid(1001)))}, [])
    # a duplicate of an item, and a file name that climbs out of the download
    add_item(subset / "json" / "dup", oid(1001), "/hostile/alpha.png", None, description="again")
    escape = {"id": oid(n := n + 1), "filename": "/../../escape.png", "description": "outside", "annotations": []}
    (subset / "json" / "hostile" / "escape.json").write_text(json.dumps(escape))
    expected = {"undecodable image": len(BAD_IMAGES), "no caption": len(NO_CAPTIONS), "unreadable json": 1,
                "prompt has no image": 1, "prompt image not found": 1, "no free-text annotation": 1,
                "duplicate item": 1, "unsafe path": 1}
    good += _add_bounded_cases(subset, ok_png, expected)
    return good, expected


def _add_bounded_cases(subset: Path, ok_png: bytes, expected: dict[str, int]) -> int:
    """What the bounded readers skip (JSON nested 100,000 deep, not UTF-8 or a FIFO; images that are FIFOs,
    devices, symlink loops or links out of the download; a JSON linked in from outside) and two captions they
    use (a 1 MB word, cut before tokenizing; a lone surrogate, replaced). Returns the good pairs added."""
    json_dir, items = subset / "json" / "bounded", subset / "items" / "bounded"
    json_dir.mkdir(parents=True)
    items.mkdir(parents=True)
    (json_dir / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (json_dir / "latin1.json").write_bytes('{"id": "x", "description": "café"}'.encode("latin-1"))
    os.mkfifo(json_dir / "pipe.json")  # (fifo.json is the record of the item fifo.png below)
    for n, name in enumerate(("fifo.png", "loop.png", "zero.png", "outside.png"), start=2001):
        add_item(subset, oid(n), f"/bounded/{name}", None, description=f"image {name}")
    os.mkfifo(items / "fifo.png")
    os.symlink(items / "loop-b.png", items / "loop.png")
    os.symlink(items / "loop.png", items / "loop-b.png")
    os.symlink("/dev/zero", items / "zero.png")
    (subset.parent.parent / "outside.png").write_bytes(ok_png)
    os.symlink(subset.parent.parent / "outside.png", items / "outside.png")
    outside_json = subset.parent.parent / "outside.json"  # names a good image inside the download
    outside_json.write_text(json.dumps({"id": oid(2009), "filename": "/captions/odd-0.png", "description": "x"}))
    os.symlink(outside_json, json_dir / "linked.json")
    word = "".join(chr(97 + (i * 7919) % 26) for i in range(1_000_000))  # open_clip's BPE on it in full: hours
    add_item(subset, oid(2010), "/bounded/long-word.png", ok_png, description=word)
    (json_dir / "surrogate.json").write_text(json.dumps(  # written as the escape \ud800, which no tokenizer encodes
        {"id": oid(2011), "filename": "/bounded/surrogate.png", "description": "a red \ud800 circle"}))
    (items / "surrogate.png").write_bytes(ok_png)
    expected.update({"unreadable json (nested too deeply)": 1, "unreadable json (not UTF-8)": 1,
                     "unreadable json (not a regular file)": 1, "image file is not a regular file": 2,
                     "image file is a symlink loop": 1, "image file links out of the download": 1,
                     "json file links out of the download": 1})
    return 2


@pytest.fixture(scope="module")
def trained_on_hostile(tmp_path_factory, tiny_model_config):
    root = tmp_path_factory.mktemp("hostile")
    data = write_dataloop_download(root / "data", 48, 16, seed=8)
    n_good, expected = build_corpus(data / "train")
    out = root / "model"
    sets = {**TINY_TRAINING, "model_name": tiny_model_config, "num_epochs": 1}
    with deadline(900, "training on the hostile download"):  # FIFOs in it: a read that opened one would block
        rc = main(["train", "--data", str(data), "--out", str(out), *set_args(sets)])
    return rc, out, 48 + n_good, expected


def test_training_succeeds_on_every_good_pair(trained_on_hostile) -> None:
    rc, out, n_good, expected = trained_on_hostile
    assert rc == 0
    report = json.loads((out / "data_report.json").read_text())["train"]
    assert report["used"] == n_good - expected["undecodable image"]
    assert (out / "open_clip_model.safetensors").is_file()


def test_each_bad_input_is_skipped_for_its_reason_with_examples(trained_on_hostile) -> None:
    _, out, _, expected = trained_on_hostile
    report = json.loads((out / "data_report.json").read_text())["train"]
    for reason, count in expected.items():
        assert report["skipped"].get(reason) == count, (reason, report["skipped"])
        assert 1 <= len(report["examples"][reason]) <= 5
    assert not set(report["skipped"]) - set(expected)  # nothing else was refused
    assert sorted(report["examples"]["undecodable image"]) == sorted(f"{oid(1001 + len(GOOD_IMAGES) + i)}"
                                                                     for i in range(len(BAD_IMAGES)))


def test_a_subset_with_no_good_pair_names_the_subset_and_reasons(tmp_path, tiny_model_config, capsys) -> None:
    data = write_dataloop_download(tmp_path / "data", 32, 0, seed=9)
    (data / "validation").mkdir()
    for i, (name, caption) in enumerate(NO_CAPTIONS.items()):
        add_item(data / "validation", oid(i), f"/v/{name}.png", b"\x89PNG", **(
            {} if caption is None else {"description": caption}))
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--set", f"model_name={tiny_model_config}",
               "--set", "pretrained=none"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "validation" in err and "3 no caption" in err
