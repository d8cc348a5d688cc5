"""A second synthetic domain, unlike synthetic.py's one shape on a plain background: a whole image of a repeating
pattern (stripes in three directions, checks, dots, a grid) in two colours, at a thin or thick scale, captioned
truthfully ("thin vertical red and blue stripes"). It shares the colour words with the shapes, so a model tuned on
one domain can forget the other (what the retention check and auto WiSE-FT are measured on: bench/never_worse.py,
tests/test_retention.py). 6 patterns x 8 x 7 colour pairs x 2 scales = 672 combinations, rendered with jitter of
phase, scale and colour and with pixel noise, so held-out images are not copies of training ones."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic import COLOURS

PATTERNS = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checks", "dots", "grid")
SCALES = {"thin": 8.0, "thick": 16.0}  # the period of the pattern, in pixels of a 64-pixel image
TEMPLATES = {
    "horizontal stripes": ("{scale} horizontal {a} and {b} stripes", "{a} and {b} stripes running across"),
    "vertical stripes": ("{scale} vertical {a} and {b} stripes", "{a} and {b} stripes running up and down"),
    "diagonal stripes": ("{scale} diagonal {a} and {b} stripes", "slanted {a} and {b} stripes"),
    "checks": ("a {scale} {a} and {b} checkerboard", "{a} and {b} checks"),
    "dots": ("{scale} {a} dots on {b}", "a {b} background covered in {a} dots"),
    "grid": ("a {scale} {a} grid on {b}", "{a} grid lines over {b}"),
}


def pattern_specs(n: int, seed: int) -> list[tuple[dict[str, str], str, int]]:
    """`n` (attributes, caption, render seed) triples, drawn uniformly; deterministic under `seed`."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    specs = []
    for _ in range(n):
        a, b = (str(c) for c in rng.choice(names, size=2, replace=False))
        attrs = {"pattern": str(rng.choice(PATTERNS)), "a": a, "b": b, "scale": str(rng.choice(list(SCALES)))}
        template = TEMPLATES[attrs["pattern"]][int(rng.integers(2))]
        specs.append((attrs, template.format(**attrs), int(rng.integers(2**31))))
    return specs


def render_pattern(attrs: dict[str, str], seed: int, size: int = 64) -> Image.Image:
    """The pattern of `attrs` as a `size` x `size` RGB image, jittered under `seed`."""
    rng = np.random.default_rng(seed)
    period = SCALES[attrs["scale"]] * rng.uniform(0.85, 1.15) * size / 64
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + rng.uniform(0, period, 2)[:, None, None]
    phase = {"horizontal stripes": y, "vertical stripes": x, "diagonal stripes": (x + y) / np.sqrt(2)}
    pattern = attrs["pattern"]
    if pattern in phase:
        mask = (phase[pattern] % period) < period / 2
    elif pattern == "checks":
        mask = ((x // (period / 2)) + (y // (period / 2))) % 2 == 0
    elif pattern == "dots":
        mask = np.hypot(x % period - period / 2, y % period - period / 2) < period / 4
    else:  # grid: thin lines of colour a every period
        mask = ((x % period) < period / 6) | ((y % period) < period / 6)
    a, b = (np.array(COLOURS[attrs[k]], np.float64) + rng.integers(-15, 16, 3) for k in ("a", "b"))
    pixels = np.where(mask[..., None], a, b) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def write_pattern_csv(path: str | Path, n: int, seed: int = 0, image_size: int = 64) -> Path:
    """A table `filepath,caption` of `n` pattern images (PNGs in a patterns/ folder beside it)."""
    path = Path(path)
    images = path.parent / "patterns"
    images.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i, (attrs, caption, render_seed) in enumerate(pattern_specs(n, seed)):
            render_pattern(attrs, render_seed, image_size).save(images / f"{i:05d}.png")
            writer.writerow([f"patterns/{i:05d}.png", caption])
    return path
