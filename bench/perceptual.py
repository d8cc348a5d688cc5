"""Copies found and false matches of the perceptual leakage check (data/perceptual.py), on synthetic pictures.

    python -m bench.perceptual [--n 1000] [--seed 0]

Two sets of distinct pictures: "scenes" (3-7 random ellipses and rectangles of random colours on a random
gradient, each picture different, as photos are) and "shapes" (the tests' captioned shapes, data/synthetic.py:
one shape of a few colours at a few places, so many pictures are nearly the same by design). Copies of each
picture are what a user means by "the same image": re-encoded as JPEG (quality 75), resized to half and to double
size, and JPEG 90 at 3/4 size. For each threshold (bits of the 64-bit pHash) it prints the share of copies found
(within the threshold of their original), the share of pictures whose nearest OTHER picture is within it (a
validation image that would be dropped wrongly against a train split of the other n-1) and the share of distinct
pairs within it.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageDraw

from adapters.clip_finetune.data.synthetic import render, sample_specs

THRESHOLDS = (0, 2, 4, 6, 8, 12, 16)
SIZE = 224


def _phash(image: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.phash(image)), 16)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def copies(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    return {"jpeg q75": _jpeg(image, 75), "half size": image.resize((w // 2, h // 2), Image.LANCZOS),
            "double size": image.resize((w * 2, h * 2), Image.BICUBIC),
            "jpeg q90 3/4 size": _jpeg(image.resize((w * 3 // 4, h * 3 // 4), Image.LANCZOS), 90)}


def scene(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """A distinct picture: random ellipses and rectangles on a random vertical gradient."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    image = Image.fromarray(np.broadcast_to((top * (1 - t) + bottom * t), (size, size, 3)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(20, 120, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    return image


def measure(originals: list[Image.Image]) -> list[str]:
    hashes = np.asarray([_phash(im) for im in originals], dtype=np.uint64)
    pairwise = np.bitwise_count(hashes[:, None] ^ hashes[None, :]).astype(int)
    np.fill_diagonal(pairwise, 99)
    nearest_other, pairs = pairwise.min(axis=1), pairwise[np.triu_indices(len(hashes), 1)]
    found: dict[str, list[int]] = {}
    for original, h in zip(originals, hashes, strict=True):
        for kind, image in copies(original).items():
            found.setdefault(kind, []).append(int(np.bitwise_count(np.uint64(_phash(image)) ^ h)))
    rows = ["| bits | " + " | ".join(f"found: {k}" for k in found) + " | nearest other within | pairs within |",
            "|---" * (len(found) + 3) + "|"]
    for t in THRESHOLDS:
        shares = " | ".join(f"{np.mean(np.asarray(d) <= t):.3f}" for d in found.values())
        rows.append(f"| {t} | {shares} | {np.mean(nearest_other <= t):.3f} | {np.mean(pairs <= t):.6f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="distinct pictures in each set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    sets = {"scenes": [scene(rng) for _ in range(args.n)],
            "shapes": [render(spec, size=SIZE) for spec in sample_specs(args.n, args.seed)]}
    for name, originals in sets.items():
        print(f"\n{name}: {args.n} distinct pictures of {SIZE} px, seed {args.seed}")
        print("\n".join(measure(originals)))


if __name__ == "__main__":
    main()
