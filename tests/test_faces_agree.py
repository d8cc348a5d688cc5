"""The faces share the engine: for the same images and the same model, the Dataloop adapter stores the very
vectors `clip-finetune embed` writes, the Python API's encode() returns them too, and training on the platform
and from the CLI writes the same data report (undecodable images counted in both)."""

from __future__ import annotations

import json
from pathlib import Path

import dtlpy as dl
import numpy as np
import pytest
from helpers import QUICK_CONFIG, set_args
from loopback_platform import LoopbackPlatform, dtlpy_pointed_at, tag_subset_filter
from PIL import Image

from adapters.clip_finetune.api import encode, get_model
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.dataloop.adapter import ClipAdapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CONFIG = {**QUICK_CONFIG, "batch_size": 4}  # embedding batches of 4: the platform and the CLI batch differently


def _images(folder: Path) -> dict[str, tuple[Path, str, str]]:
    """{name: (file, caption, subset)}: JPEGs large enough for draft decoding (4x the tiny model's 64-pixel
    input), PNGs, an RGBA PNG and one file that is not an image at all, in train."""
    folder.mkdir()
    out = {}
    for i, spec in enumerate(sample_specs(24, seed=5)):
        subset = "train" if i < 16 else "validation"
        image = render(spec, size=64)
        if i % 3 == 0:
            name = f"{i:02d}.jpg"
            image.resize((320, 256), Image.Resampling.BICUBIC).save(folder / name, quality=90)
        elif i % 3 == 1:
            name = f"{i:02d}.png"
            image.save(folder / name)
        else:
            name = f"{i:02d}-alpha.png"
            image.convert("RGBA").save(folder / name)
        out[name] = (folder / name, spec.captions[0], subset)
    (folder / "99-broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out["99-broken.jpg"] = (folder / "99-broken.jpg", "a broken photo", "train")
    return out


def test_the_adapter_the_cli_and_the_api_give_equal_vectors_and_data_reports(tmp_path, monkeypatch) -> None:
    images = _images(tmp_path / "images")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # train_model downloads under ./tmp/<model id>/
    with LoopbackPlatform() as platform, dtlpy_pointed_at(platform):
        project = platform.add_project()
        dataset = platform.add_dataset(project["id"], "photos")
        items = {name: platform.add_item(dataset["id"], path, f"/photos/{name}", description=caption, tags=[subset])
                 for name, (path, caption, subset) in images.items()}
        model_json = platform.add_model(project["id"], "tiny", CONFIG, dataset["id"],
                                        subsets={s: tag_subset_filter(s) for s in ("train", "validation")})

        # the platform: train, then embed every item with the trained model
        ClipAdapter().train_model(dl.models.get(model_id=model_json["id"]))
        trained = dl.models.get(model_id=model_json["id"])
        adapter = ClipAdapter(trained)
        adapter.embed_items([dl.items.get(item_id=item["id"]) for item in items.values()])
        feature_set = platform.model_feature_sets(trained.id)[0]
        stored = {v["entityId"]: np.array(v["value"], np.float32) for v in platform.vectors(feature_set["id"])}
        artifacts = platform.artifact_files(trained.id)
        model_dir = tmp_path / "trained"
        model_dir.mkdir()
        for name, data in artifacts.items():
            (model_dir / name).write_bytes(data)
        download = next((work / "tmp" / trained.id / "datasets").iterdir())

    # the CLI on the same files, with the same model
    assert main(["embed", "--model", str(model_dir), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "cli.npz")]) == 0
    with np.load(tmp_path / "cli.npz") as cli:
        by_path = dict(zip(cli["ids"].tolist(), cli["vectors"], strict=True))
    good = [name for name in images if name != "99-broken.jpg"]
    assert set(stored) == {items[name]["id"] for name in good}  # the broken file has no vector on either side
    assert set(by_path) == {str(images[name][0]) for name in good}
    for name in good:
        np.testing.assert_allclose(stored[items[name]["id"]], by_path[str(images[name][0])], atol=1e-6, rtol=0)

    # the Python API: files and PIL images through the same pipeline
    tower = get_model(model_dir, "clip-vision")
    files = [str(images[name][0]) for name in good]
    np.testing.assert_allclose(encode(tower, files), np.stack([by_path[f] for f in files]), atol=1e-6, rtol=0)
    pngs = [f for f in files if f.endswith(".png")]
    np.testing.assert_allclose(encode(tower, [Image.open(f) for f in pngs]), np.stack([by_path[f] for f in pngs]),
                               atol=1e-6, rtol=0)

    # the data report: the platform's (uploaded with the model) and the CLI's, training on the same download
    assert main(["train", "--data", str(download), "--out", str(tmp_path / "cli-model"), *set_args(CONFIG)]) == 0
    platform_report = json.loads(artifacts["data_report.json"])
    cli_report = json.loads((tmp_path / "cli-model" / "data_report.json").read_text())
    assert platform_report == cli_report
    assert platform_report["train"]["skipped"] == {"undecodable image": 1}
    assert platform_report["train"]["examples"]["undecodable image"] == [items["99-broken.jpg"]["id"]]
    assert platform_report["train"]["used"] == 16 and platform_report["validation"]["used"] == 8
