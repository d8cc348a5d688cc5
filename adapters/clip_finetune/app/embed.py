"""Embed: image files or texts into an embeddings file (one process), or into one shard's part of a sharded
folder; the items listed from a folder, a table or a text file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import FinetuneConfig
from ..errors import DataError

if TYPE_CHECKING:
    import numpy as np  # noqa: TC004  (imported where used: importing the app loads no numpy)
    import torch

    from ..model.clip import ClipModel
    from ..retrieval.shards import ShardSpec

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


@dataclass
class Embedded:
    """What an embed wrote: `count` vectors of `dimensions` to `out`; a shard's `summary` when sharded."""

    count: int
    dimensions: int
    out: Path
    summary: str = ""


def list_images(source: str, what: str, column_names: tuple[str | None, str | None] = (None, None)) -> list[str]:
    """The image files of a folder (every image suffix, sorted), or the distinct images a table names; `what`
    names the source in messages."""
    path = Path(source)
    if path.is_dir():  # files that are not images (FIFOs, links to nothing) are skipped when decoded, and listed
        from ..data.labels import IMAGE_SUFFIXES

        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not path.exists():
        raise DataError(f"{what} {source!r} does not exist; give a folder of images or a CSV/TSV/JSONL table")
    from ..data.tables import read_table

    return list(dict.fromkeys(p.image for p in read_table(path, column_names=column_names)))


def list_texts(source: str, column_names: tuple[str | None, str | None] = (None, None)) -> list[str]:
    """The captions of a table (its `column_names`: image, caption; None: the usual names), or the non-empty
    lines of a text file."""
    path = Path(source)
    if path.suffix.lower() in TABLE_SUFFIXES:
        from ..data.tables import read_table

        return [p.caption for p in read_table(path, column_names=column_names)]
    from ..data.safe_read import text_lines

    return text_lines(path)  # a regular file, UTF-8 (or the encoding it looks like is named), bounded lines


def embed_items(clip: ClipModel, cfg: FinetuneConfig, kind: str, items: list[str], out: str | Path,
                spec: ShardSpec | None = None) -> Embedded:
    """Embed `items` ("images" or "texts") with `clip` into `out`: the one file, or this shard's part."""
    if cfg.compile and kind == "images":
        from ..model.compiling import compile_module

        compile_module(clip.model.visual, "the image tower")
    if spec is not None:
        from ..retrieval.shards import embed_shard

        settings = {"max_image_pixels": cfg.max_image_pixels} if kind == "images" else {}
        done = embed_shard(clip, kind, items, out, spec, cfg.batch_size, cfg.num_workers, settings)
        return Embedded(0, 0, Path(out), done.summary)
    from ..retrieval.embed import encode_items
    from ..retrieval.provenance import made_by
    from ..retrieval.store import save_embeddings

    ids, vectors, _ = encode_items(clip, kind, items, cfg.batch_size, cfg.num_workers)
    path = save_embeddings(out, ids, vectors, made_by(clip, kind))
    return Embedded(len(ids), vectors.shape[1], Path(path))


# --- the platform's embedding (dataloop/: the adapter's embed, its jobs and nodes): items prepared one by one
# by the face (downloads, prompt items), then embedded in batches here, by the one embedding pipeline


def item_input(clip: ClipModel, data: bytes, name: str | None = None) -> torch.Tensor:
    """One image's bytes as `clip` takes it ([3, H, W]); ImageDecodeError (a DataError) naming it when it cannot
    be decoded."""
    from ..retrieval.embed import image_input

    return image_input(clip, data, name)


def embed_inputs(clip: ClipModel, images: torch.Tensor | None, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of prepared images [n, 3, H, W] (None: none) and of texts, float32 [n, d] each."""
    import numpy as np

    from ..retrieval.embed import encode_image_tensors, encode_texts

    image_vectors = encode_image_tensors(clip, images) if images is not None else np.zeros((0, clip.embed_dim))
    text_vectors = encode_texts(clip, texts, batch_size=len(texts)) if texts else np.zeros((0, clip.embed_dim))
    return image_vectors, text_vectors
