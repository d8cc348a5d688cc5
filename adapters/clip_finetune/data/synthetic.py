"""Learnable synthetic caption data: one coloured shape on a plain background, captioned truthfully.

A tiny random-init CLIP learns it on a CPU in about a minute, and retrieving the right image needs both
colour and shape (every caption names them) and usually position and size too. 8 colours x 5 shapes x
2 sizes x 5 positions x 4 backgrounds = 1600 attribute combinations, each rendered with jitter of
position, size, colours and pixel noise, so held-out images are not copies of training images.

Files are PNG: lossless, so pixels read back are exactly those rendered (the determinism tests compare
them) and saturated colours keep crisp edges at 64x64 where JPEG's 4:2:0 chroma subsampling would smear them.
Writers lay files out exactly as a Dataloop subset download (see data.read_subset) or as a CSV table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .dataloop import ImageResolver, image_ref

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 215),
    "blue": (40, 70, 225),
    "purple": (140, 50, 190),
    "pink": (245, 110, 185),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (120, 120, 120),
    "beige": (225, 210, 175),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
SIZES: dict[str, float] = {"small": 0.24, "large": 0.44}  # shape extent, as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {  # shape centre (x, y), as fractions of the image side
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
# The words a caption may use for each attribute value; a caption never uses another value's words.
VOCABULARY: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {c: (c,) for c in COLOURS},
    "shape": {s: (s,) for s in SHAPES},
    "size": {"small": ("small", "tiny"), "large": ("large", "big")},
    "position": {"left": ("left",), "right": ("right",), "top": ("top",), "bottom": ("bottom",),
                 "centre": ("centre", "middle")},
    "background": {b: (b,) for b in BACKGROUNDS},
}
_POSITION_PHRASES = {"left": ("on the left", "at the left"), "right": ("on the right", "at the right"),
                     "top": ("at the top",), "bottom": ("at the bottom",),
                     "centre": ("in the centre", "in the middle")}
# {position} is a phrase ("on the left"), {where} a bare word ("left"). Every template names colour and
# shape; most name the position, so few captions in a batch fit more than one image.
TEMPLATES = (
    "a {size} {colour} {shape} {position}",
    "a {colour} {shape} {position}",
    "photo of a {colour} {shape} {position} on a {background} background",
    "{size} {colour} {shape}, {where}",
    "{position}, a {size} {colour} {shape}",
    "a {background} background with a {colour} {shape} {position}",
    "there is a {size} {colour} {shape} {position}",
    "{colour} {shape} ({size}), {where}, {background} background",
    "a {size} {colour} {shape} on {background}",
    "an image of a {colour} {shape}",
)
N_COMBINATIONS = int(np.prod([len(v) for v in ATTRIBUTES.values()]))
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges


@dataclass(frozen=True)
class SyntheticSample:
    """The attributes of one image, its captions (all truthful) and the seed of its rendering jitter."""

    attributes: dict[str, str]
    caption: str
    captions: tuple[str, ...] = ()  # every caption of the image; captions[0] == caption
    seed: int = 0


def sample_specs(n: int, seed: int, captions_per_image: int = 1) -> list[SyntheticSample]:
    """`n` samples with uniformly drawn attributes and `captions_per_image` distinct-template captions each;
    deterministic under `seed`."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        attrs = {name: str(rng.choice(values)) for name, values in ATTRIBUTES.items()}
        k = min(captions_per_image, len(TEMPLATES))
        templates = rng.choice(len(TEMPLATES), size=k, replace=False)
        captions = tuple(_caption(TEMPLATES[t], attrs, rng) for t in templates)
        samples.append(SyntheticSample(attrs, captions[0], captions, int(rng.integers(2**31))))
    return samples


def _caption(template: str, attrs: dict[str, str], rng: np.random.Generator) -> str:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    words = {
        "colour": attrs["colour"],
        "shape": attrs["shape"],
        "size": str(rng.choice(VOCABULARY["size"][attrs["size"]])),
        "position": str(rng.choice(_POSITION_PHRASES[attrs["position"]])),
        "where": str(rng.choice(VOCABULARY["position"][attrs["position"]])),
        "background": attrs["background"],
    }
    text = template.format(**{f: words[f] for f in fields})
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange" -> "an orange"


def render(sample: SyntheticSample, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw `sample` as a `size` x `size` RGB image; jitter comes from `rng` (default: the sample's seed)."""
    rng = rng if rng is not None else np.random.default_rng(sample.seed)
    a = sample.attributes
    side = size * _SUPERSAMPLE
    im = Image.new("RGB", (side, side), _jitter(BACKGROUNDS[a["background"]], rng, 8))
    cx, cy = (np.array(POSITIONS[a["position"]]) + rng.uniform(-0.04, 0.04, 2)) * side
    radius = SIZES[a["size"]] * rng.uniform(0.9, 1.1) * side / 2
    fill = _jitter(COLOURS[a["colour"]], rng, 15)
    _draw_shape(ImageDraw.Draw(im), a["shape"], float(cx), float(cy), radius, fill)
    pixels = np.asarray(im.resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    pixels += rng.normal(0, 3, pixels.shape)  # sensor-like noise: no two images are pixel-identical
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)
    return r, g, b


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """Shapes of similar area for one radius, so size is told by extent, not by shape."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        t = 0.35 * r  # half the bar thickness
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(0.4 * r)))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


# --- writers --------------------------------------------------------------------------------------------

DATASET_ID = "5f0000000000000000000000"
_GATE = "https://gate.dataloop.ai/api/v1"


def object_id(*parts: object) -> str:
    """A deterministic 24-hex-digit id, shaped like a Dataloop (MongoDB) id."""
    return hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()[:24]


def stream_url(item_id: str) -> str:
    return f"{_GATE}/items/{item_id}/stream"


def write_dataloop_download(
    root: str | Path,
    n_train: int,
    n_validation: int,
    seed: int = 0,
    image_size: int = 64,
    prompt_items: bool = False,
    captions_per_image: int = 1,
) -> Path:
    """Write root/train and root/validation exactly as Dataloop subset downloads look; returns root.

    Plain items (default): one PNG per item with its caption in `description`, which holds one caption
    only, so `captions_per_image` is ignored for them. Prompt items: each items/ file is a prompt JSON with
    `captions_per_image` prompts referencing one image by stream URL, each captioned by a free-text
    annotation (promptId); the images lie in root/_images/ (outside the subsets, as on the platform, where
    they are separate items) with an index.json, and `synthetic_resolver(root)` fetches them.
    """
    root = Path(root)
    specs = sample_specs(n_train + n_validation, seed, captions_per_image if prompt_items else 1)
    index: dict[str, str] = {}
    for split, chunk in (("train", specs[:n_train]), ("validation", specs[n_train:])):
        for i, sample in enumerate(chunk):
            name = f"{split}-{i:05d}"
            png = _png_bytes(render(sample, image_size))
            if prompt_items:
                image_id = object_id(seed, split, i, "image")
                (root / "_images").mkdir(parents=True, exist_ok=True)
                (root / "_images" / f"{image_id}.png").write_bytes(png)
                index[image_id] = f"{image_id}.png"
                _write_prompt_item(root / split, name, object_id(seed, split, i, "prompt"), image_id, sample)
            else:
                item_id = object_id(seed, split, i, "image")
                _write_image_item(root / split, name, item_id, png, sample, image_size)
    if prompt_items:
        (root / "_images" / "index.json").write_text(json.dumps(index, indent=1))
    return root


def synthetic_resolver(root: str | Path) -> ImageResolver:
    """The resolver of a prompt-item download: item ids or stream URLs -> files in root/_images."""
    folder = Path(root) / "_images"
    index_file = folder / "index.json"
    index: dict[str, str] = json.loads(index_file.read_text()) if index_file.is_file() else {}

    def resolve(refs: list[str]) -> dict[str, str]:
        return {ref: str(folder / index[image_ref(ref)]) for ref in refs if image_ref(ref) in index}

    return resolve


def write_csv(path: str | Path, n: int, seed: int = 0, image_size: int = 64, delimiter: str = ",") -> Path:
    """A table with header `filepath,caption` (relative paths) and its PNGs in an images/ folder beside it."""
    path = Path(path)
    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["filepath", "caption"])
        for i, sample in enumerate(sample_specs(n, seed)):
            render(sample, image_size).save(images / f"{i:05d}.png")
            writer.writerow([f"images/{i:05d}.png", sample.caption])
    return path


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _item_json(item_id: str, filename: str, mimetype: str, size: int, split: str, **extra: object) -> dict:
    """An item record as the platform exports it (the keys a subset download's json/ files carry)."""
    return {
        "id": item_id,
        "datasetId": DATASET_ID,
        "filename": filename,
        "dir": str(Path(filename).parent),
        "name": Path(filename).name,
        "type": "file",
        "hidden": False,
        "metadata": {"system": {"mimetype": mimetype, "size": size, "tags": {split: True}}},
        **extra,
    }


def _write_image_item(
    folder: Path, name: str, item_id: str, png: bytes, sample: SyntheticSample, px: int
) -> None:
    filename = f"/synthetic/{name}.png"
    record = _item_json(item_id, filename, "image/png", len(png), folder.name,
                        description=sample.caption, annotated=False, annotations=[])
    record["metadata"]["system"].update(width=px, height=px)
    _write(folder / "items" / filename.lstrip("/"), png)
    _write(folder / "json" / "synthetic" / f"{name}.json", json.dumps(record, indent=1).encode())


def _write_prompt_item(folder: Path, name: str, item_id: str, image_id: str, sample: SyntheticSample) -> None:
    keys = [str(k) for k in range(1, len(sample.captions) + 1)]
    prompt = {
        "shebang": "dataloop",
        "metadata": {"dltype": "prompt"},
        "prompts": {k: [{"mimetype": "image/*", "value": stream_url(image_id)},
                        {"mimetype": "metadata", "value": {"role": "user"}}] for k in keys},
    }
    content = json.dumps(prompt, indent=1).encode()
    annotations = [
        {"id": object_id(item_id, k), "itemId": item_id, "datasetId": DATASET_ID, "type": "text",
         "label": "free-text", "coordinates": caption,
         "metadata": {"system": {"promptId": k}, "user": {}}}
        for k, caption in zip(keys, sample.captions, strict=True)
    ]
    filename = f"/synthetic/{name}.json"
    record = _item_json(item_id, filename, "application/json", len(content), folder.name,
                        description=None, annotated=True, annotations=annotations)
    record["metadata"]["system"]["shebang"] = {"dltype": "prompt"}
    _write(folder / "items" / filename.lstrip("/"), content)
    _write(folder / "json" / "synthetic" / f"{name}.json", json.dumps(record, indent=1).encode())


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
