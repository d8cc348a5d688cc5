"""Labels as captions: a labelled image without a description trains on a caption made from its label by a
template ("a photo of a {label}."), as CLIP's zero-shot prompts; a hierarchical label ("vehicle.car") counts
by its leaf. Also the reader of a folder per class (`root/<class>/*.jpg`, optionally under train/, validation/,
test/)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config import DEFAULT_LABEL_TEMPLATES
from .pairs import CaptionPair, DataReport

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Dataloop annotation types whose label names what is in the image (text annotations are captions instead)
LABEL_TYPES = frozenset({"class", "box", "polygon", "segment", "binary", "ellipse", "point", "cube"})
DEFAULT_TEMPLATE = DEFAULT_LABEL_TEMPLATES[0]


def label_leaf(label: Any) -> str:
    """The class a label names: the last part of a Dataloop hierarchy ('vehicle.car' -> 'car'), underscores as
    spaces ('traffic_light' -> 'traffic light'); '' for no label."""
    if not isinstance(label, str):
        return ""
    leaf = label.strip().rstrip(".").rpartition(".")[2]
    return " ".join(leaf.replace("_", " ").split())


def label_caption(label: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.format(label=label)


def label_pairs(image: str, labels: Iterable[Any], item_id: str, template: str = DEFAULT_TEMPLATE
                ) -> list[CaptionPair]:
    """One templated pair per distinct leaf of `labels` (an image with a car and a person trains on both)."""
    leaves = dict.fromkeys(leaf for leaf in map(label_leaf, labels) if leaf)
    return [CaptionPair(image, label_caption(leaf, template), item_id, leaf, templated=True) for leaf in leaves]


def annotation_labels(annotations: Any) -> list[str]:
    """The labels of a Dataloop item's classification, box, polygon (...) annotations, in order."""
    out = []
    for a in annotations if isinstance(annotations, list) else []:
        if isinstance(a, dict) and a.get("type") in LABEL_TYPES and isinstance(a.get("label"), str):
            out.append(a["label"])
    return out


def is_class_folder_layout(folder: Path) -> bool:
    """A folder whose sub-folders hold images directly (ImageFolder's layout), not Dataloop downloads."""
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return any(_has_images(d) for d in subdirs) and not any((d / "json").is_dir() for d in subdirs)


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def read_class_folders(folder: str | Path, report: DataReport | None = None, template: str = DEFAULT_TEMPLATE
                       ) -> list[CaptionPair]:
    """Pairs of a folder per class: every image under `folder/<class>/` (nested folders: the innermost names
    the class) captioned by the template. Images directly in `folder` have no class and are skipped."""
    folder = Path(folder)
    report = report if report is not None else DataReport()
    pairs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(folder)
        if len(rel.parts) < 2:
            report.skip("image outside a class folder", str(rel))
            continue
        # no item id: a relative path repeats across train/ and validation/, and would link unrelated images
        found = label_pairs(str(path), [rel.parts[-2]], "", template)
        if not found:  # '...', '___': nothing is left of the name to caption the image with
            report.skip("class folder name is no label", str(rel))
        pairs += found
    report.used = len(pairs)
    return pairs
