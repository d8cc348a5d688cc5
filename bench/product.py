"""Product-photo-like caption data in a Dataloop download layout, for `python -m bench.train --preset product`.

Each picture is one product (a mug, a bottle, a lamp, ...) of one colour and surface (plain, striped, dotted),
at the middle of a plain light background with a soft shadow, drawn at 320x240 with position, scale, colour
and background jitter and sensor-like noise, saved as a JPEG. Its title is a short shop title in English or
German ("Striped blue mug", "Tasse in Blau, gestreift") that names what is visible, so a tiny CLIP learns it.
About a quarter of the pairs of each split are a second photo of a product already in that split, with the
same title (duplicate captions, as a shop lists a product's photos); no title is shared between splits.

The files are laid out as `dtlpy`'s `dataset.download(annotation_options=JSON)` writes a subset: `items/` holds
the images under their remote path, `json/` one item record each (id, filename, description, metadata), which
adapters.clip_finetune.data.dataloop.read_subset reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from adapters.clip_finetune.data.synthetic import DATASET_ID, object_id

# name: (English noun, German noun)
PRODUCTS = {
    "mug": ("mug", "Tasse"), "bottle": ("bottle", "Flasche"), "lamp": ("table lamp", "Tischlampe"),
    "shirt": ("t-shirt", "T-Shirt"), "chair": ("chair", "Stuhl"), "backpack": ("backpack", "Rucksack"),
    "watch": ("watch", "Armbanduhr"), "vase": ("vase", "Vase"), "book": ("notebook", "Notizbuch"),
    "headphones": ("headphones", "Kopfhörer"), "shoe": ("sneaker", "Sneaker"), "box": ("gift box", "Geschenkbox"),
}
# name: (RGB, English, German)
COLOURS = {
    "red": ((200, 35, 40), "red", "Rot"), "blue": ((35, 75, 200), "blue", "Blau"),
    "green": ((40, 150, 60), "green", "Grün"), "yellow": ((235, 200, 30), "yellow", "Gelb"),
    "orange": ((240, 130, 25), "orange", "Orange"), "purple": ((125, 50, 170), "purple", "Lila"),
    "pink": ((240, 115, 175), "pink", "Rosa"), "brown": ((120, 75, 40), "brown", "Braun"),
    "grey": ((115, 115, 120), "grey", "Grau"), "black": ((25, 25, 28), "black", "Schwarz"),
}
PATTERNS = {"plain": ("", ""), "striped": ("striped", "gestreift"), "dotted": ("dotted", "gepunktet")}
BACKGROUNDS = ((250, 250, 250), (236, 236, 238), (246, 241, 230), (232, 238, 244))
EN_TITLES = ("{Pattern} {colour} {noun}", "{Noun}, {colour}{, pattern}", "{Colour} {noun}{ - pattern}",
             "Classic {pattern} {colour} {noun}", "{Colour} {pattern} {noun} for everyday use")
DE_TITLES = ("{Noun} in {Colour}{, pattern}", "{Noun} {Colour}{ pattern}", "{Noun}, Farbe {Colour}{, pattern}",
             "{Noun} - Klassiker in {Colour}{, pattern}")
DUPLICATE_SHARE = 0.25


def _title(rng: np.random.Generator, product: str, colour: str, pattern: str) -> str:
    german = rng.random() < 0.4
    noun = PRODUCTS[product][german]
    colour_word = COLOURS[colour][1 + german]
    pattern_word = PATTERNS[pattern][german]
    template = str(rng.choice(DE_TITLES if german else EN_TITLES))
    text = template.replace("{, pattern}", f", {pattern_word}" if pattern_word else "")
    text = text.replace("{ - pattern}", f" - {pattern_word}" if pattern_word else "")
    text = text.replace("{ pattern}", f" {pattern_word}" if pattern_word else "")
    text = text.format(noun=noun, Noun=noun[0].upper() + noun[1:], colour=colour_word, Colour=colour_word,
                       pattern=pattern_word, Pattern=pattern_word)
    text = " ".join(text.split())
    return text[0].upper() + text[1:]


def product_specs(n: int, rng: np.random.Generator, used_titles: set[str]) -> list[dict]:
    """`n` photos: ~75% new products with titles not in `used_titles` (which grows), the rest second photos of
    products drawn before (same title)."""
    products: list[dict] = []
    specs = []
    for _ in range(n):
        if products and rng.random() < DUPLICATE_SHARE:
            base = products[int(rng.integers(len(products)))]
        else:
            while True:
                attrs = {"product": str(rng.choice(list(PRODUCTS))), "colour": str(rng.choice(list(COLOURS))),
                         "pattern": str(rng.choice(list(PATTERNS)))}
                title = _title(rng, **attrs)
                if title not in used_titles:
                    break
            used_titles.add(title)
            base = {**attrs, "title": title}
            products.append(base)
        specs.append({**base, "seed": int(rng.integers(2**31))})
    return specs


def render_product(spec: dict, width: int = 320, height: int = 240) -> Image.Image:
    """The photo of `spec`: the product at the middle of a light background, with a soft shadow and noise."""
    rng = np.random.default_rng(spec["seed"])
    bg = tuple(int(np.clip(c + rng.integers(-6, 7), 0, 255)) for c in BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    scale = 2  # drawn at 2x, then downsampled: smooth edges
    w, h = width * scale, height * scale
    im = Image.new("RGB", (w, h), bg)
    r = min(w, h) * rng.uniform(0.30, 0.40)  # half the product's extent
    cx, cy = w / 2 + rng.uniform(-0.08, 0.08) * w, h / 2 + rng.uniform(-0.06, 0.06) * h
    shadow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(shadow).ellipse((cx - r, cy + 0.85 * r, cx + r, cy + 1.05 * r), fill=70)
    shadow = shadow.filter(ImageFilter.GaussianBlur(r / 8))
    im.paste(Image.new("RGB", (w, h), tuple(int(c * 0.6) for c in bg)), (0, 0), shadow)
    colour = tuple(int(np.clip(c + rng.integers(-18, 19), 0, 255)) for c in COLOURS[spec["colour"]][0])
    mask = Image.new("L", (w, h), 0)
    _draw_product(ImageDraw.Draw(mask), spec["product"], cx, cy, r)
    body = Image.new("RGB", (w, h), colour)
    _pattern(body, spec["pattern"], colour, r, rng)
    im.paste(body, (0, 0), mask)
    im = im.resize((width, height), Image.Resampling.BOX)
    pixels = np.asarray(im, dtype=np.float32) + 2.0 * rng.standard_normal((height, width, 3), np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _pattern(body: Image.Image, pattern: str, colour: tuple, r: float, rng: np.random.Generator) -> None:
    """Light stripes or dots over the product's colour (white on dark colours, dark on light ones)."""
    if pattern == "plain":
        return
    ink = (245, 245, 245) if sum(colour) < 450 else (40, 40, 40)
    draw, (w, h) = ImageDraw.Draw(body), body.size
    step = r / 3 * rng.uniform(0.9, 1.1)
    if pattern == "striped":
        for y in np.arange(rng.uniform(0, step), h, step):
            draw.rectangle((0, y, w, y + step * 0.4), fill=ink)
    else:
        for y in np.arange(rng.uniform(0, step), h, step):
            for x in np.arange(rng.uniform(0, step), w, step):
                draw.ellipse((x, y, x + step * 0.45, y + step * 0.45), fill=ink)


def _draw_product(d: ImageDraw.ImageDraw, product: str, cx: float, cy: float, r: float) -> None:  # noqa: C901
    """The product's silhouette (255 inside) in a mask: one outline per category, similar areas."""
    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return cx + x0 * r, cy + y0 * r, cx + x1 * r, cy + y1 * r

    if product == "mug":
        d.rounded_rectangle(box(-0.6, -0.7, 0.45, 0.8), r * 0.1, fill=255)
        d.ellipse(box(0.25, -0.4, 0.95, 0.35), outline=255, width=int(r * 0.15))
    elif product == "bottle":
        d.rounded_rectangle(box(-0.35, -0.3, 0.35, 1.0), r * 0.15, fill=255)
        d.rectangle(box(-0.13, -1.0, 0.13, -0.2), fill=255)
    elif product == "lamp":
        d.polygon([(cx - 0.35 * r, cy - r), (cx + 0.35 * r, cy - r), (cx + 0.75 * r, cy - 0.2 * r),
                   (cx - 0.75 * r, cy - 0.2 * r)], fill=255)
        d.rectangle(box(-0.06, -0.2, 0.06, 0.85), fill=255)
        d.ellipse(box(-0.5, 0.75, 0.5, 1.0), fill=255)
    elif product == "shirt":
        d.polygon([(cx - 0.45 * r, cy - 0.9 * r), (cx - r, cy - 0.55 * r), (cx - 0.75 * r, cy - 0.15 * r),
                   (cx - 0.5 * r, cy - 0.3 * r), (cx - 0.5 * r, cy + r), (cx + 0.5 * r, cy + r),
                   (cx + 0.5 * r, cy - 0.3 * r), (cx + 0.75 * r, cy - 0.15 * r), (cx + r, cy - 0.55 * r),
                   (cx + 0.45 * r, cy - 0.9 * r), (cx, cy - 0.7 * r)], fill=255)
    elif product == "chair":
        d.rectangle(box(-0.55, -1.0, -0.4, 1.0), fill=255)
        d.rectangle(box(-0.55, 0.0, 0.6, 0.15), fill=255)
        d.rectangle(box(0.45, 0.0, 0.6, 1.0), fill=255)
        d.rectangle(box(-0.55, -1.0, 0.0, -0.85), fill=255)
    elif product == "backpack":
        d.rounded_rectangle(box(-0.6, -0.8, 0.6, 0.95), r * 0.35, fill=255)
        d.ellipse(box(-0.25, -1.05, 0.25, -0.65), outline=255, width=int(r * 0.1))
    elif product == "watch":
        d.rectangle(box(-0.22, -1.0, 0.22, 1.0), fill=255)
        d.ellipse(box(-0.5, -0.5, 0.5, 0.5), fill=255)
    elif product == "vase":
        d.ellipse(box(-0.7, -0.3, 0.7, 1.0), fill=255)
        d.rectangle(box(-0.22, -0.95, 0.22, 0.0), fill=255)
        d.ellipse(box(-0.4, -1.05, 0.4, -0.8), fill=255)
    elif product == "book":
        d.polygon([(cx - 0.6 * r, cy - 0.9 * r), (cx + 0.7 * r, cy - 0.75 * r), (cx + 0.7 * r, cy + 0.95 * r),
                   (cx - 0.6 * r, cy + 0.8 * r)], fill=255)
    elif product == "headphones":
        d.arc(box(-0.75, -0.95, 0.75, 0.6), 180, 360, fill=255, width=int(r * 0.14))
        d.rounded_rectangle(box(-0.95, -0.2, -0.45, 0.65), r * 0.15, fill=255)
        d.rounded_rectangle(box(0.45, -0.2, 0.95, 0.65), r * 0.15, fill=255)
    elif product == "shoe":
        d.polygon([(cx - r, cy + 0.5 * r), (cx - r, cy - 0.1 * r), (cx - 0.4 * r, cy - 0.3 * r),
                   (cx + 0.1 * r, cy + 0.05 * r), (cx + 0.9 * r, cy + 0.2 * r), (cx + r, cy + 0.5 * r)], fill=255)
    elif product == "box":
        d.rectangle(box(-0.75, -0.45, 0.75, 0.9), fill=255)
        d.rectangle(box(-0.85, -0.7, 0.85, -0.4), fill=255)
        d.ellipse(box(-0.45, -1.0, 0.0, -0.65), outline=255, width=int(r * 0.08))
        d.ellipse(box(0.0, -1.0, 0.45, -0.65), outline=255, width=int(r * 0.08))
    else:
        raise ValueError(f"unknown product {product!r}")


def write_subset(folder: Path, split: str, specs: list[dict], width: int, height: int) -> list[tuple[str, str]]:
    """`specs` as a Dataloop subset download in `folder` (items/ + json/); returns (image path, title) pairs.
    Files already there are reused."""
    pairs = []
    for i, spec in enumerate(specs):
        name = f"{split}-{i:05d}"
        remote = f"/products/{name}.jpg"
        path = folder / "items" / remote.lstrip("/")
        record_path = folder / "json" / "products" / f"{name}.json"
        if not (path.is_file() and record_path.is_file()):
            path.parent.mkdir(parents=True, exist_ok=True)
            render_product(spec, width, height).save(path, "JPEG", quality=90)
            item_id = object_id("product", split, i)
            record = {"id": item_id, "datasetId": DATASET_ID, "filename": remote, "dir": "/products",
                      "name": path.name, "type": "file", "hidden": False, "annotated": False, "annotations": [],
                      "description": spec["title"],
                      "metadata": {"system": {"mimetype": "image/jpeg", "size": path.stat().st_size,
                                              "width": width, "height": height, "tags": {split: True}}}}
            record_path.parent.mkdir(parents=True, exist_ok=True)
            record_path.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
        pairs.append((str(path), spec["title"]))
    return pairs


def write_product_download(root: Path, sizes: dict[str, int], seed: int, width: int, height: int
                           ) -> dict[str, list[tuple[str, str]]]:
    """root/<split>/ for each split of `sizes` ({"train": 2000, "validation": 400, ...}), each a subset download;
    returns each split's (image path, title) pairs. No title is shared between splits."""
    rng, used = np.random.default_rng(seed), set()
    return {split: write_subset(root / split, split, product_specs(n, rng, used), width, height)
            for split, n in sizes.items()}
