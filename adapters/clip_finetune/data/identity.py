"""When two pairs are the same: an image is its file's content (the same photo stored under two paths is one
image), a caption is its normalised text (case, width and spacing do not make two captions). Splits, the
duplicate-aware loss and evaluation all key pairs this way (docs/data.md)."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from .pairs import CaptionPair, has_item_id, item_key

_SPACES = re.compile(r"\s+")
_EDGE_PUNCTUATION = " \t\n.,;:!?\"'()[]"
_CHUNK = 1 << 20
UNREADABLE = "path:"  # content_key's prefix for a file it could not read: keyed by its path instead


def normalise_caption(text: str) -> str:
    """A caption's identity: NFKC (full-width -> ASCII), case-folded, runs of spaces made one, end punctuation
    dropped: 'A red  circle.' and 'a red circle' are one caption."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    return text.strip(_EDGE_PUNCTUATION)


def content_key(path: str) -> str:
    """An image's identity: the BLAKE2b digest of its file (cached while the file's device, inode, size, mtime
    and ctime hold: a file rewritten with its old size and mtime restored, as cp -p, rsync -t and unzip do, still
    gets a new ctime, which no user call can set back); a file that cannot be read is keyed by its path (it is
    skipped later, when it fails to decode)."""
    try:
        st = os.stat(path)
    except OSError:
        return f"{UNREADABLE}{os.path.normpath(path)}"
    return _digest(os.path.normpath(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@lru_cache(maxsize=1 << 20)
def _digest(path: str, stamp: tuple[int, ...]) -> str:
    h = hashlib.blake2b(digest_size=16)  # hashlib: C speed (~1 GB/s); collisions are out of reach at 128 bits
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return f"{UNREADABLE}{path}"
    return h.hexdigest()


def dense_ids(keys: Sequence[str]) -> np.ndarray:
    """Keys as small integers, equal keys equal: ['b', 'a', 'b'] -> [0, 1, 0]."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def pair_keys(pairs: Sequence[CaptionPair]) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, caption ids) of `pairs` as integers: pairs with equal image content share an image id, pairs
    with equal normalised captions a caption id."""
    return (dense_ids([content_key(p.image) for p in pairs]),
            dense_ids([normalise_caption(p.caption) for p in pairs]))


def linked_groups(pairs: Sequence[CaptionPair]) -> np.ndarray:
    """A group id per pair: pairs that share an image (by content), an item, or a caption (normalised) that is
    not made from a label template, are in one group, transitively. Held-out splits move whole groups, so no image and
    no written caption straddles them (a label's template caption is shared by a whole class by design)."""
    # a union-find in a few lines: scipy's connected_components would do it, but scipy is no dependency
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving: near-constant time per lookup
            i = parent[i]
        return i

    first: dict[tuple[str, ...], int] = {}
    for i, p in enumerate(pairs):
        keys = [("image", content_key(p.image))]
        if has_item_id(p):
            keys.append(("item", *item_key(p)))
        if not p.templated:
            keys.append(("caption", normalise_caption(p.caption)))
        for key in keys:
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    return dense_ids([str(find(i)) for i in range(len(pairs))])
