"""The same picture by what it shows, not by its bytes: a perceptual hash (imagehash's pHash, 64 bits) changes by a few
bits when a picture is re-encoded, resized or saved in another format, while the leakage guard's content key
(identity.py) changes entirely. Used by the guard when `leakage_picture_distance` is set (docs/data.md gives the
measured false matches). imagehash is an optional extra (pip install imagehash); only the nearest-hash search over
the train images is written here (numpy's XOR and bit count over all hashes at once)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from ..errors import ConfigError, DataError
from .images import load_image

logger = logging.getLogger(__name__)


def _imagehash():  # noqa: ANN202  (the module, imported when the check is asked for)
    try:
        import imagehash
    except ImportError:
        raise ConfigError("leakage_picture_distance: the perceptual check needs imagehash; pip install imagehash "
                          "(or pip install -e \".[perceptual]\"), or set leakage_picture_distance to null") from None
    return imagehash


def picture_hash(path: str) -> int | None:
    """The 64-bit pHash of the image at `path`; None when it cannot be decoded (the reader counts that)."""
    imagehash = _imagehash()
    try:
        image = load_image(path)
    except DataError:
        return None
    return int(str(imagehash.phash(image)), 16)


class PictureIndex:
    """The pHashes of a set of images (the train split), asked for the nearest one to another image."""

    def __init__(self, paths: Iterable[str]) -> None:
        unique = sorted(set(paths))
        if len(unique) > 1000:
            logger.info("hashing %d train images for the perceptual leakage check", len(unique))
        hashes = [h for h in map(picture_hash, unique) if h is not None]
        self.hashes = np.asarray(hashes, dtype=np.uint64)

    def nearest(self, path: str) -> int | None:
        """Bits between the image at `path` and the nearest indexed image; None for an undecodable image or none
        indexed."""
        h = picture_hash(path)
        if h is None or not len(self.hashes):
            return None
        return int(np.bitwise_count(self.hashes ^ np.uint64(h)).min())
