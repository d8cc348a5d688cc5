"""Pictures of a run: training curves (matplotlib) and a before/after "search sheet" (Pillow)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..data.images import load_image

CURVE_KEYS = ("text_to_image/recall@1", "text_to_image/recall@5", "image_to_text/recall@1")


def plot_training_curves(
    history: Sequence[Mapping[str, float]], path: str | Path, before: Mapping[str, float] | None = None
) -> Path:
    """Loss, learning rate and validation recall per epoch, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    epochs = [int(h["epoch"]) for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(epochs, [h["lr"] for h in history], marker="o", color="tab:orange")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for key in CURVE_KEYS:
        if history and key in history[0]:
            xs, ys = epochs, [h[key] for h in history]
            if before and key in before:  # epoch 0 is the base model
                xs, ys = [0, *xs], [before[key], *ys]
            axes[2].plot(xs, ys, marker="o", label=key.replace("text_to_image", "t→i").replace("image_to_text", "i→t"))
    axes[2].set(title="validation recall", xlabel="epoch", ylim=(0, 1.02))
    if axes[2].lines:
        axes[2].legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def search_sheet(
    queries: Sequence[str],
    before: Sequence[Sequence[str]],
    after: Sequence[Sequence[str]],
    relevant: Sequence[set[str]],
    path: str | Path,
    thumb: int = 72,
) -> Path:
    """For each query, its top-k images before and after fine-tuning; relevant images framed in green.

    `before[i]` / `after[i]` are the ranked image paths for `queries[i]`; `relevant[i]` the correct ones.
    """
    k = max(len(r) for r in [*before, *after])
    pad, label_h, gap = 6, 18, 24
    col_w = k * (thumb + pad)
    width = pad + 2 * col_w + gap
    row_h = label_h + thumb + 2 * pad
    sheet = Image.new("RGB", (width, 26 + row_h * len(queries)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((pad, 6), f"before fine-tuning (top-{k})", fill="black", font=font)
    draw.text((pad + col_w + gap, 6), f"after fine-tuning (top-{k})", fill="black", font=font)
    for row, query in enumerate(queries):
        y = 26 + row * row_h
        draw.text((pad, y), f"\u201c{query}\u201d", fill="black", font=font)
        for side, ranked in enumerate((before[row], after[row])):
            x0 = pad + side * (col_w + gap)
            for j, image_path in enumerate(ranked):
                x, yy = x0 + j * (thumb + pad), y + label_h
                hit = image_path in relevant[row]
                draw.rectangle([x - 3, yy - 3, x + thumb + 2, yy + thumb + 2], fill="#2e9e44" if hit else "#d0d0d0")
                sheet.paste(load_image(image_path).resize((thumb, thumb)), (x, yy))
    path = Path(path)
    sheet.save(path)
    return path
