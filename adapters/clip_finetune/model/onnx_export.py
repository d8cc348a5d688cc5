"""Export a model's image and text towers to ONNX, for inference without torch or open_clip's model code.

`export_onnx(model_dir, out_dir)` writes into `out_dir`:

- `image_encoder.onnx`: `pixel_values` float32 [batch, 3, H, W] -> `image_embeds` float32 [batch, D], unit norm
- `text_encoder.onnx`: `input_ids` int64 [batch, context_length] -> `text_embeds` float32 [batch, D], unit norm
- `preprocess.json`: the image preprocessing of open_clip's eval transform and the tokenizer settings
- `tokenizer/`: only for Hugging Face tokenizers, their `save_pretrained` files

The batch axis is dynamic. Everything is written to a temporary folder beside `out_dir` and renamed into place,
so a crash never leaves a half-written export. docs/onnx.md shows how to run the files with onnxruntime.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg

from ..errors import ModelError, Setting
from .clip import ClipModel, load_artifact
from .weights import unwrap

log = logging.getLogger(__name__)

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
# ONNX-runtime embeddings must match torch's to this cosine on the export check, else the export fails
MIN_COSINE = 0.999
_SAMPLE_TEXTS = ["a photo of a dog", "a diagram", "two red circles on a white background"]


class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values, normalize=True)


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=True)


def export_onnx(
    model: str | Path | ClipModel, out_dir: str | Path, opset: int | None = None, verify: bool = True
) -> Path:
    """Export the towers of a saved model folder (or a loaded ClipModel) to `out_dir`; return `out_dir`.

    Exports a CPU fp32 copy in eval mode (a given ClipModel is not changed). `opset`: ONNX opset (default:
    the exporter's). `verify`: run both files with onnxruntime (when installed) on sample inputs at another
    batch size than the traced one and raise ModelError if any row's cosine to torch is below 0.999.
    """
    out = Path(out_dir).expanduser().resolve()
    if isinstance(model, ClipModel):
        clip = model
    else:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ModelError(f"cannot export {str(folder)!r} to ONNX: the model folder does not exist")
        clip = load_artifact(folder, "cpu")
    _refuse_foreign_folder(out)
    require_exporter()
    net = copy.deepcopy(unwrap(clip.model)).to(device="cpu", dtype=torch.float32).eval()
    image_size = _image_size(net)
    sample_images = torch.randn((2, 3, *image_size), generator=torch.Generator().manual_seed(0))
    try:
        sample_texts = clip.tokenizer(_SAMPLE_TEXTS[:2]).to(torch.int64)
    except Exception as e:  # a tokenizer that needs files or packages that are missing
        raise ModelError(f"cannot tokenize with the tokenizer of {clip.source}: {type(e).__name__}: {e}") from e

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _export("image", _ImageTower(net), sample_images, "pixel_values", "image_embeds", tmp / IMAGE_FILE, opset, clip)
        _export("text", _TextTower(net), sample_texts, "input_ids", "text_embeds", tmp / TEXT_FILE, opset, clip)
        settings = {
            "format": "clip-finetune onnx export v1",
            "source": clip.source,
            "embed_dim": clip.embed_dim,
            "image": _image_settings(net, image_size),
            "text": _text_settings(clip, tmp),
            "logit_scale": _scalar(getattr(net, "logit_scale", None), exp=True),
            "logit_bias": _scalar(getattr(net, "logit_bias", None)),
            "opset": _opset(tmp / IMAGE_FILE),
        }
        if verify:
            settings["verified_min_cosine"] = _verify(net, clip, tmp, image_size)
        (tmp / PREPROCESS_FILE).write_text(json.dumps(settings, indent=2))
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s", clip.source, out)
    return out


def require_exporter() -> None:
    """Raise ModelError unless this torch can export and the ONNX packages are installed."""
    if "dynamic_shapes" not in inspect.signature(torch.onnx.export).parameters:
        raise ModelError(f"ONNX export needs torch's dynamo exporter (torch 2.5 or later); this is {torch.__version__}")
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise ModelError(
                f"ONNX export needs the {module!r} package: pip install -e \".[onnx]\" in this checkout (or pip "
                f"install onnx onnxscript onnxruntime)"
            ) from None


def _refuse_foreign_folder(out: Path) -> None:
    """`out` may be missing, empty or an earlier export (replaced); anything else is not ours to replace."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PREPROCESS_FILE).is_file())):
        raise ModelError(
            f"{str(out)!r} exists and is not an earlier ONNX export (no {PREPROCESS_FILE}); not replacing it, "
            "pick a new folder"
        )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Flush every file to disk, then swap `tmp` in for `out` (an earlier export is removed after the swap)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export(
    what: str,
    tower: torch.nn.Module,
    sample: torch.Tensor,
    input_name: str,
    output_name: str,
    path: Path,
    opset: int | None,
    clip: ClipModel,
) -> None:
    # The dynamo exporter (torch.export + onnxscript; torch's default since 2.9), not the TorchScript one
    # (dynamo=False, deprecated): with torch 2.15 the TorchScript export of open_clip's ModifiedResNet (RN50)
    # image tower ran but returned wrong embeddings (cosine 0.04-0.13 to torch, at every batch size) with only a
    # tracer warning; the dynamo export matched torch on every architecture tried (docs/onnx.md). It is slower
    # (seconds, not a fraction) and needs onnxscript.
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript"):
            warnings.simplefilter("ignore")  # the exporter's deprecation/tracing chatter is not the user's
            program = torch.onnx.export(
                tower.eval(),
                (sample,),
                dynamo=True,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes={input_name: {0: batch}},
                opset_version=opset,
                verbose=False,
            )
            # weights go into an external `<file>.data` only past protobuf's 2 GB limit
            program.save(str(path))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        net = tower.model  # CLIP keeps its text tower in .transformer, CustomTextCLIP in .text
        module = net.visual if what == "image" else getattr(net, "text", None) or getattr(net, "transformer", net)
        raise ModelError(
            f"cannot export the {what} tower ({type(module).__name__}) of {clip.source} to ONNX with opset "
            f"{opset or 'default'}: {type(e).__name__}: {first}"
        ) from e
    if opset is not None and _opset(path) != opset:  # the exporter falls back to its own opset, only warning
        raise ModelError(
            f"{{opset}}: torch's ONNX exporter wrote opset {_opset(path)} instead (below the opsets it "
            "implements it relies on ONNX's version converter, which failed on this model); use a higher opset or "
            "leave it out", advice={"opset": Setting("opset", str(opset))}
        )


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only errors from these loggers for the block: the exporter's optimiser logs every pass at INFO, and a
    constant-folding attempt it skips at WARNING (harmless: the export is checked against torch)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _scalar(value: torch.Tensor | None, exp: bool = False) -> float | None:
    """A learnt scalar for scoring: cosine * logit_scale (+ logit_bias for SigLIP)."""
    if value is None:
        return None
    value = value.detach().float()
    return float(value.exp() if exp else value)


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _image_size(net: torch.nn.Module) -> tuple[int, int]:
    size = open_clip.get_model_preprocess_cfg(net).get("size") or getattr(net.visual, "image_size", None)
    if size is None:
        raise ModelError("cannot export to ONNX: the model does not say its image size")
    return (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[1]))


def _image_settings(net: torch.nn.Module, image_size: tuple[int, int]) -> dict[str, Any]:
    """open_clip's eval transform (`image_transform(..., is_train=False)`) as data, from the model's preprocess_cfg."""
    cfg = {**vars(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(net)}
    h, w = image_size
    mode, interp = cfg["resize_mode"], cfg["interpolation"]
    if mode == "squash":
        steps = [f"resize to {w}x{h} (width x height), ignoring the aspect ratio ({interp})"]
    elif mode == "longest":
        steps = [f"resize so the image fits in {w}x{h}, keeping the aspect ratio ({interp})",
                 f"pad to {w}x{h}, centred, with the value {cfg['fill_color']}"]
    elif h == w:
        steps = [f"resize the shorter side to {h}, keeping the aspect ratio ({interp}); the longer side becomes "
                 f"int({h} * long / short)", f"centre crop {w}x{h} (offsets int(round((side - {h}) / 2)))"]
    else:
        steps = [f"resize keeping the aspect ratio to the smallest size that covers {w}x{h} (width x height, bicubic)",
                 f"centre crop {w}x{h}"]
    return {
        "input": "pixel_values",
        "layout": "NCHW",
        "dtype": "float32",
        "size": [h, w],
        "mode": cfg["mode"],
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": interp,
        "resize_mode": mode,
        "fill_color": cfg["fill_color"],
        "steps": [f"decode and convert to {cfg['mode']}", *steps, "scale to [0, 1] (divide by 255)",
                  "subtract mean and divide by std, per channel", "HWC -> CHW, stack into a batch"],
    }


def _text_settings(clip: ClipModel, tmp: Path) -> dict[str, Any]:
    tok = clip.tokenizer
    text_cfg = clip.model_cfg.get("text_cfg", {})
    settings: dict[str, Any] = {
        "input": "input_ids",
        "dtype": "int64",
        "context_length": int(tok.context_length),
        "tokenizer": type(tok).__name__,
        "tokenizer_kwargs": text_cfg.get("tokenizer_kwargs", {}),
    }
    if isinstance(tok, open_clip.tokenizer.SimpleTokenizer):
        settings.update(
            vocab="CLIP BPE, bpe_simple_vocab_16e6.txt.gz (shipped with open_clip_torch)",
            sot_token_id=tok.sot_token_id,
            eot_token_id=tok.eot_token_id,
            pad_token_id=0,
            usage=(
                "open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH, **TOKENIZER_KWARGS)(texts), "
                "or open_clip.get_tokenizer('local-dir:<saved model folder>'): lowercases, cleans whitespace, "
                "wraps in sot/eot, truncates and pads with 0 to context_length"
            ),
        )
    elif hasattr(tok, "save_pretrained"):  # open_clip's HFTokenizer / SigLipTokenizer wrap a transformers one
        tok.save_pretrained(str(tmp / TOKENIZER_DIR))
        settings.update(hf_tokenizer_name=text_cfg.get("hf_tokenizer_name"), files=TOKENIZER_DIR)
        if isinstance(tok, open_clip.tokenizer.HFTokenizer):
            settings["usage"] = (
                f"open_clip.tokenizer.HFTokenizer('<this folder>/{TOKENIZER_DIR}', context_length=CONTEXT_LENGTH, "
                "**TOKENIZER_KWARGS)(texts) (needs transformers): cleans, pads and truncates to context_length"
            )
        else:
            settings["usage"] = (
                f"transformers.AutoTokenizer.from_pretrained('<this folder>/{TOKENIZER_DIR}'), used as open_clip's "
                f"{type(tok).__name__} does (or open_clip.get_tokenizer on the source model)"
            )
    else:
        settings["usage"] = "the tokenizer of the source model: open_clip.get_tokenizer(...) on it"
    return settings


def _verify(net: torch.nn.Module, clip: ClipModel, folder: Path, image_size: tuple[int, int]) -> float | None:
    """Lowest per-row cosine of ONNX-runtime vs torch embeddings on sample inputs at batch 3 (traced at 2)."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX export is not checked against torch")
        return None
    images = torch.rand((3, 3, *image_size), generator=torch.Generator().manual_seed(1))
    texts = clip.tokenizer(_SAMPLE_TEXTS).to(torch.int64)
    with torch.no_grad():
        expected = [net.encode_image(images, normalize=True).numpy(), net.encode_text(texts, normalize=True).numpy()]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    worst = 1.0
    for (name, inputs), want in zip(((IMAGE_FILE, images), (TEXT_FILE, texts)), expected, strict=True):
        session = ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
        cos = float(np.min(np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))))
        if not cos >= MIN_COSINE:  # also catches NaN
            raise ModelError(f"the ONNX export of {name} disagrees with torch: cosine {cos:.4f} < {MIN_COSINE}")
        worst = min(worst, cos)
    return round(worst, 6)
