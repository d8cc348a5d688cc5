"""Open any image file a user may have as an upright 8-bit RGB PIL image, or fail with a clear DataError."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError
from ..inputs import file_problem
from ..machine import PILLOW_MAX_IMAGE_PIXELS, set_max_image_pixels

logger = logging.getLogger(__name__)

__all__ = ["PILLOW_MAX_IMAGE_PIXELS", "ImageDecodeError", "decode", "load_image", "set_max_image_pixels", "to_rgb"]
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(DataError):
    """An image file cannot be decoded: missing, empty, truncated, not an image, or too large."""


def load_image(source: str | Path | bytes, name: str | None = None, draft: int | None = None) -> Image.Image:
    """Decode a file (or its bytes) fully into an RGB image: EXIF orientation applied, transparency composited
    onto white, 16-bit grayscale scaled to 8 bits, CMYK converted, first frame of an animation.

    `draft`: decode a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) whose sides both stay >= `draft`
    pixels (much faster on large JPEGs; see fastpath.py).

    Raises ImageDecodeError naming the file (`name`, else the path) and the reason on any failure.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        problem = None if isinstance(source, bytes) else file_problem(source)
        if problem is not None:  # never opened: a FIFO would block, /dev/zero never ends
            raise _Refused("file not found" if problem[0] == "missing" else problem[1])
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        if size == 0:
            raise _Refused("empty file (0 bytes)")
        # Pillow only warns between 1x and 2x its pixel limit; refuse there too, before any allocation.
        # (catch_warnings is not thread-safe; _check_size below refuses even when the warning slips past.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                _check_size(im)
                im.seek(0)  # animated GIF/WebP/APNG: the first frame
                if draft and im.format == "JPEG":
                    im.draft(None, (draft, draft))
                im.load()
                return to_rgb(im)
    except _Refused as e:
        raise ImageDecodeError(f"cannot decode image {label!r}: {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"cannot decode image {label!r}: {_bomb_message(e)}") from None
    except FileNotFoundError:
        raise ImageDecodeError(f"cannot decode image {label!r}: file not found") from None
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, IndexError...
        raise ImageDecodeError(
            f"cannot decode image {label!r}: {type(e).__name__}: {e}; re-export the file or remove it"
        ) from e


def decode(source: str | Path | bytes | Image.Image, name: str | None = None, draft: int | None = None
           ) -> Image.Image:
    """An image file, its bytes or a PIL image as an upright RGB image (load_image; a PIL image gets the same
    orientation and RGB conversion, to_rgb)."""
    return to_rgb(source) if isinstance(source, Image.Image) else load_image(source, name, draft=draft)


def to_rgb(image: Image.Image) -> Image.Image:
    """What load_image does once a file is decoded, for an image already in memory (a PIL image and its file
    give the same pixels): EXIF orientation applied, then RGB. Always a copy, detached from any file."""
    upright = _upright(image)  # a copy: an RGB one needs no second
    return upright if upright.mode == "RGB" else _to_rgb(upright)


class _Refused(Exception):
    """Internal: a check of ours refused the file; the message is the reason."""


def _check_size(im: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    w, h = im.size
    if limit is not None and w * h > limit:
        raise _Refused(_bomb_message(f"{w}x{h} = {w * h} pixels exceeds the limit of {limit}"))


def _bomb_message(detail: object) -> str:
    return (f"possible decompression bomb ({detail}); if the image is trusted, raise the limit with "
            "set_max_image_pixels(n) (or the max_image_pixels setting)")


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag; an unreadable EXIF block is ignored (the pixels are still fine)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # malformed EXIF raises assorted errors; orientation is a nicety, not a must
        logger.debug("ignoring unreadable EXIF of %s: %s", getattr(im, "filename", "?"), e)
        return im.copy()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), im.mode), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB (a copy, so the file handle can close)


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-bit-depth grayscale to 0..255 (Pillow's own convert('L') clips at 255 instead)."""
    a = a.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and a.max(initial=0) > 255):
        a = a / 257.0  # 65535 -> 255
    elif mode == "F" and a.max(initial=0) <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
