"""export-hf: a saved model becomes a transformers CLIPModel folder whose embeddings match ours (both towers),
its tokenizer gives open_clip's ids, and architectures transformers cannot hold are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL

from adapters.clip_finetune.config import FinetuneConfig
from adapters.clip_finetune.errors import ModelError
from adapters.clip_finetune.model.clip import load_artifact, load_model, save_artifact

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a large red circle on the left", "photo of a blue triangle at the top on a black background",
            "Ünïcode café, naïve résumé! 123", ""]


def _saved(tmp_path: Path, model_name: str = str(TINY_MODEL), seed: int = 3) -> Path:
    clip = load_model(FinetuneConfig(model_name=model_name, pretrained=None, seed=seed), device="cpu")
    with torch.no_grad():  # weights unlike any init, so a wrongly mapped tensor cannot match by chance
        for p in clip.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return save_artifact(clip, tmp_path / "model")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from adapters.clip_finetune.model.hf_export import export_hf

    tmp = tmp_path_factory.mktemp("hf")
    model_dir = _saved(tmp)
    return model_dir, export_hf(model_dir, tmp / "hf")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_both_towers_of_the_transformers_model_embed_as_ours(exported: tuple[Path, Path]) -> None:
    model_dir, hf_dir = exported
    ours = load_artifact(model_dir, device="cpu", precision="fp32")
    hf = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(hf_dir)
    context = ours.model_cfg["text_cfg"]["context_length"]
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=context, truncation=True, return_tensors="pt")
    with torch.no_grad():
        our_img = ours.model.encode_image(pixels).numpy()
        our_txt = ours.model.encode_text(ours.tokenizer(CAPTIONS)).numpy()
        hf_img = hf.get_image_features(pixel_values=pixels)
        hf_txt = hf.get_text_features(input_ids=ids["input_ids"])
    hf_img = getattr(hf_img, "pooler_output", hf_img).numpy()  # transformers 5 may return an output object
    hf_txt = getattr(hf_txt, "pooler_output", hf_txt).numpy()
    assert _cosines(our_img, hf_img).min() >= 0.999
    assert _cosines(our_txt, hf_txt).min() >= 0.999
    assert float(hf.logit_scale.detach().exp()) == pytest.approx(float(ours.model.logit_scale.detach().exp()), rel=1e-5)


def test_the_exported_tokenizer_gives_open_clips_ids(exported: tuple[Path, Path]) -> None:
    model_dir, hf_dir = exported
    ours = load_artifact(model_dir, device="cpu", precision="fp32")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(hf_dir)
    for caption, row in zip(CAPTIONS, ours.tokenizer(CAPTIONS).tolist(), strict=True):
        theirs = tokenizer(caption)["input_ids"]
        assert row[: len(theirs)] == theirs, caption  # up to the end-of-text token; padding differs (0 vs EOT)


def test_the_folder_loads_with_the_processor_and_says_what_it_is(exported: tuple[Path, Path]) -> None:
    _, hf_dir = exported
    processor = transformers.CLIPProcessor.from_pretrained(hf_dir)
    from PIL import Image

    batch = processor(text=["a red circle"], images=[Image.new("RGB", (80, 60), "red")], return_tensors="pt",
                      padding=True)
    assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["projection_dim"] == 64 and config["vision_config"]["patch_size"] == 8


def test_an_architecture_transformers_cannot_hold_is_refused_with_the_reason(tmp_path: Path) -> None:
    from adapters.clip_finetune.model.hf_export import export_hf

    cfg = json.loads(TINY_MODEL.read_text())
    cfg["vision_cfg"]["pool_type"] = "avg"  # mean pooling: transformers' CLIP pools the class token only
    path = tmp_path / "clip-tiny-avg.json"
    path.write_text(json.dumps(cfg))
    model_dir = _saved(tmp_path, str(path))
    with pytest.raises(ModelError, match="image pooling other than the class token.*export-onnx"):
        export_hf(model_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_existing_folder_with_files_is_not_overwritten(exported: tuple[Path, Path], tmp_path: Path) -> None:
    from adapters.clip_finetune.model.hf_export import export_hf

    model_dir, _ = exported
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not an empty folder"):
        export_hf(model_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
