"""`clip-finetune export-onnx`: both towers run in onnxruntime and match torch's embeddings, at any batch size."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from adapters.clip_finetune.cli.main import main  # noqa: E402
from adapters.clip_finetune.config import build_config  # noqa: E402
from adapters.clip_finetune.data.images import load_image  # noqa: E402
from adapters.clip_finetune.errors import ModelError  # noqa: E402
from adapters.clip_finetune.model.clip import load_artifact, load_model, save_artifact  # noqa: E402
from adapters.clip_finetune.model.onnx_export import export_onnx  # noqa: E402
from adapters.clip_finetune.retrieval.embed import encode_images, encode_texts  # noqa: E402

DOCS = REPO / "docs" / "onnx.md"
TEXTS = ["a red circle", "Two BLUE squares,   side by side!", "a very long caption " * 20]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_config, one_torch_thread) -> dict:
    """A tiny random-init model saved like a trained one, exported by the CLI; its printed output."""
    root = tmp_path_factory.mktemp("onnx")
    cfg = build_config({"model_name": str(tiny_model_config), "pretrained": None, "device": "cpu", "seed": 7})
    torch.manual_seed(7)
    model_dir = save_artifact(load_model(cfg), root / "model", cfg)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export-onnx", "--model", str(model_dir), "--out", str(model_dir / "onnx")]) == 0
    return {"model": model_dir, "out": model_dir / "onnx", "stdout": stdout.getvalue(), "root": root}


@pytest.fixture(scope="module")
def clip(exported):
    return load_artifact(exported["model"], "cpu")


@pytest.fixture(scope="module")
def settings(exported) -> dict:
    return json.loads((exported["out"] / "preprocess.json").read_text())


@pytest.fixture(scope="module")
def image_files(exported) -> list[str]:
    """Real image files of other sizes, aspect ratios and modes than the model's input."""
    rng = np.random.default_rng(0)
    folder = exported["root"] / "images"
    folder.mkdir()
    specs = [("wide.png", (90, 50), "RGB"), ("tall.jpg", (48, 100), "RGB"), ("grey.png", (64, 64), "L")]
    paths = []
    for name, (w, h), mode in specs:
        ramp = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
        pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        image.save(folder / name, **({"quality": 90} if name.endswith(".jpg") else {}))
        paths.append(str(folder / name))
    return paths


def session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def docs_helpers() -> dict:
    """preprocess_image and tokenize exactly as docs/onnx.md prints them."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    namespace: dict = {}
    for block in blocks:
        if "def preprocess_image" in block or "def tokenize" in block:
            exec(block, namespace)
    return namespace


def test_cli_writes_both_towers_and_the_settings_and_says_so(exported) -> None:
    out = exported["out"]
    assert {p.name for p in out.iterdir()} == {"image_encoder.onnx", "text_encoder.onnx", "preprocess.json"}
    for name in ("image_encoder.onnx", "text_encoder.onnx", "preprocess.json"):
        assert name in exported["stdout"]
    assert str(out) in exported["stdout"] and "lowest cosine" in exported["stdout"]
    # written through a temporary folder that is gone afterwards; the model folder is otherwise untouched
    assert not [p.name for p in exported["model"].iterdir() if p.name.startswith(".")]


def test_inputs_and_outputs_have_the_documented_names_types_and_a_dynamic_batch(exported, clip) -> None:
    for name, input_name, dtype, tail, output_name in (
        ("image_encoder.onnx", "pixel_values", "tensor(float)", [3, 64, 64], "image_embeds"),
        ("text_encoder.onnx", "input_ids", "tensor(int64)", [clip.tokenizer.context_length], "text_embeds"),
    ):
        s = session(exported["out"] / name)
        (inp,), (outp,) = s.get_inputs(), s.get_outputs()
        assert (inp.name, inp.type, inp.shape[1:]) == (input_name, dtype, tail)
        assert isinstance(inp.shape[0], str)  # symbolic: any batch size
        assert (outp.name, outp.type, outp.shape[1:]) == (output_name, "tensor(float)", [clip.embed_dim])


def test_image_tower_matches_torch_on_image_files_at_batch_3_and_1(exported, clip, image_files) -> None:
    expected, kept = encode_images(clip, image_files, batch_size=8, num_workers=0, progress=False, draft=False)
    assert kept == [0, 1, 2]
    pixels = torch.stack([clip.preprocess(load_image(p)) for p in image_files]).numpy()
    s = session(exported["out"] / "image_encoder.onnx")
    batch = s.run(None, {"pixel_values": pixels})[0]
    singles = np.concatenate([s.run(None, {"pixel_values": pixels[i : i + 1]})[0] for i in range(3)])
    for got in (batch, singles):
        assert got.shape == (3, clip.embed_dim) and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert row_cosines(got, expected).min() >= 0.999
    # different images give different embeddings (a constant output would pass the checks above)
    assert row_cosines(batch, batch[[1, 2, 0]]).max() < 0.999


def test_text_tower_matches_torch_at_batch_3_and_1(exported, clip) -> None:
    expected = encode_texts(clip, TEXTS)
    ids = clip.tokenizer(TEXTS).numpy()
    assert ids.dtype == np.int64
    s = session(exported["out"] / "text_encoder.onnx")
    batch = s.run(None, {"input_ids": ids})[0]
    singles = np.concatenate([s.run(None, {"input_ids": ids[i : i + 1]})[0] for i in range(3)])
    for got in (batch, singles):
        assert got.shape == (3, clip.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert row_cosines(got, expected).min() >= 0.999
    assert row_cosines(batch, batch[[1, 2, 0]]).max() < 0.999


def test_preprocess_json_matches_the_torch_transform(settings, clip) -> None:
    from torchvision import transforms as T

    steps = {type(t).__name__: t for t in clip.preprocess.transforms}
    image = settings["image"]
    assert image["resize_mode"] == "shortest"
    assert image["size"] == [steps["Resize"].size] * 2 == list(steps["CenterCrop"].size)
    assert T.InterpolationMode(image["interpolation"]) == steps["Resize"].interpolation
    np.testing.assert_allclose(image["mean"], steps["Normalize"].mean)
    np.testing.assert_allclose(image["std"], steps["Normalize"].std)
    text = settings["text"]
    assert text["context_length"] == clip.tokenizer.context_length == 32
    assert text["tokenizer"] == "SimpleTokenizer"
    assert settings["embed_dim"] == clip.embed_dim
    assert settings["verified_min_cosine"] >= 0.999
    assert settings["logit_scale"] == pytest.approx(float(clip.model.logit_scale.detach().exp()), rel=1e-6)


def test_the_docs_recipe_reproduces_the_torch_preprocessing_and_tokens(exported, settings, clip, image_files) -> None:
    helpers = docs_helpers()
    for path in image_files:
        ours = helpers["preprocess_image"](path, settings)
        torch_pixels = clip.preprocess(load_image(path)).numpy()
        assert ours.shape == torch_pixels.shape and ours.dtype == np.float32
        np.testing.assert_allclose(ours, torch_pixels, atol=1e-5)
    np.testing.assert_array_equal(helpers["tokenize"](TEXTS, settings), clip.tokenizer(TEXTS).numpy())
    # and end to end, torch-free inputs into the ONNX towers give the torch embeddings
    pixels = np.stack([helpers["preprocess_image"](p, settings) for p in image_files])
    got = session(exported["out"] / "image_encoder.onnx").run(None, {"pixel_values": pixels})[0]
    expected, _ = encode_images(clip, image_files, batch_size=8, num_workers=0, progress=False, draft=False)
    assert row_cosines(got, expected).min() >= 0.999


def test_a_missing_model_folder_is_a_clear_error(tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-model"
    assert main(["export-onnx", "--model", str(missing), "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err
    assert "export-onnx: error" in err and str(missing) in err and "does not exist" in err
    assert not (tmp_path / "onnx").exists()


def test_a_folder_that_is_no_saved_model_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="not a saved model folder"):
        export_onnx(tmp_path, tmp_path / "onnx")


def test_an_unrelated_out_folder_is_not_replaced(exported, tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not an earlier ONNX export"):
        export_onnx(exported["model"], tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_a_failing_tower_leaves_no_export_and_names_the_tower(exported, clip, tmp_path, monkeypatch) -> None:
    real_export = torch.onnx.export

    @functools.wraps(real_export)
    def export_image_then_fail(tower, args, *a, **kw):
        if kw.get("input_names") == ["input_ids"]:
            raise RuntimeError("unsupported operator aten::frobnicate\nmore detail")
        return real_export(tower, args, *a, **kw)

    monkeypatch.setattr(torch.onnx, "export", export_image_then_fail)
    was_training = clip.model.train().training
    with pytest.raises(ModelError, match=r"text tower .* ONNX .*RuntimeError: unsupported operator aten::frobnicate$"):
        export_onnx(clip, tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []  # the image file written before the failure went with its temp folder
    assert clip.model.training == was_training  # the caller's model is left as it was
    clip.model.eval()


def test_the_export_check_rejects_files_that_disagree_with_torch(exported, clip, tmp_path) -> None:
    from adapters.clip_finetune.model.onnx_export import _verify

    other = load_artifact(exported["model"], "cpu").model.eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    with pytest.raises(ModelError, match="disagrees with torch: cosine"):
        _verify(other, clip, exported["out"], (64, 64))


def test_a_hugging_face_text_tower_exports_with_its_tokenizer(tmp_path, tiny_model_config, one_torch_thread) -> None:
    """A CustomTextCLIP with a (tiny, local, random-init) BERT text tower and a Hugging Face tokenizer."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from open_clip.tokenizer import HFTokenizer

    hf = tmp_path / "tiny-bert"
    transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64).save_pretrained(hf)
    words = "a photo of dog cat red blue circle square two the on".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                         cls_token="[CLS]", sep_token="[SEP]").save_pretrained(hf)
    arch = json.loads(tiny_model_config.read_text())
    arch["text_cfg"] = {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf), "hf_model_pretrained": False,
                        "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 16}
    (tmp_path / "tiny-hf-clip.json").write_text(json.dumps(arch))
    cfg = build_config({"model_name": str(tmp_path / "tiny-hf-clip.json"), "pretrained": None, "device": "cpu"})
    clip = load_model(cfg)
    assert type(clip.tokenizer).__name__ == "HFTokenizer"

    earlier = tmp_path / "onnx"  # an earlier export is replaced as a whole
    earlier.mkdir()
    (earlier / "preprocess.json").write_text("{}")
    (earlier / "stale.onnx").write_text("old")
    out = export_onnx(clip, earlier)
    assert out == earlier and not (out / "stale.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "tiny-bert", "tiny-hf-clip.json"]
    text = json.loads((out / "preprocess.json").read_text())["text"]
    assert (text["tokenizer"], text["files"], text["context_length"]) == ("HFTokenizer", "tokenizer", 16)
    texts = ["a photo of a dog", "two red circle", "blue square on the cat"]
    ids = HFTokenizer(str(out / text["files"]), context_length=text["context_length"])(texts).numpy()
    np.testing.assert_array_equal(ids, clip.tokenizer(texts).numpy())  # the saved tokenizer is the model's
    s = session(out / "text_encoder.onnx")
    expected = encode_texts(clip, texts)
    for got in (s.run(None, {"input_ids": ids})[0], np.concatenate([s.run(None, {"input_ids": ids[i : i + 1]})[0]
                                                                     for i in range(3)])):
        assert row_cosines(got, expected).min() >= 0.999


def test_a_requested_opset_is_honoured_or_refused_never_silently_changed(exported, tmp_path, capsys) -> None:
    out = tmp_path / "onnx17"
    code = main(["export-onnx", "--model", str(exported["model"]), "--out", str(out), "--opset", "17"])
    if code == 0:  # an exporter that can convert down to 17
        import onnx

        assert {o.version for o in onnx.load(str(out / "image_encoder.onnx")).opset_import if o.domain == ""} == {17}
    else:  # torch 2.15's exporter starts at opset 18 and its conversion down fails on CLIP
        assert code == 2 and not out.exists()
        assert "--opset 17: torch's ONNX exporter wrote opset 18 instead" in capsys.readouterr().err
