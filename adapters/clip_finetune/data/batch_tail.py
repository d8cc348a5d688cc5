"""The last two steps of open_clip's image transforms, ToTensor and Normalize, run once per batch.

Per sample they cost ~0.13 ms of Python and small-tensor overhead for a 64-px image (torchvision's to_tensor
and normalize: several tensor calls each), a third of a cached training sample's augmentation
(docs/performance.md). The random and PIL steps before them (RandomResizedCrop, the RGB conversion) still run
per sample with the sample's own seed; each sample then becomes a uint8 [C, H, W] tensor, and the batch is
stacked, divided by 255 and normalized in three calls. The element-wise operations are the ones torchvision
applies (float32 division by 255, then subtract the mean, divide by the std), so the pixels are bit-identical
(tests/test_fast_paths.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T


class Tail(NamedTuple):
    """The transform's own ToTensor and Normalize steps, and Normalize's mean and std ([C] each)."""

    to_tensor: Callable
    normalize: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: object) -> torch.Tensor:
        """The two steps on one image, as the whole transform runs them (for what as_uint8 declines)."""
        return self.normalize(self.to_tensor(image))


def split_tail(transform: Callable) -> tuple[Callable, Tail | None]:
    """(the steps before ToTensor + Normalize, their Tail) for a Compose ending with those two; (transform,
    None) for anything else (it then runs whole, per sample)."""
    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 2 or not isinstance(transform, T.Compose):
        return transform, None
    to_tensor, normalize = steps[-2], steps[-1]
    if type(to_tensor).__call__ not in (T.ToTensor.__call__, _maybe_to_tensor_call()) \
            or type(normalize) is not T.Normalize or normalize.inplace:
        return transform, None
    mean, std = tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std)
    if len(mean) != len(std) or not all(std):
        return transform, None  # torchvision's own error for a zero std is raised by the whole transform
    return T.Compose(steps[:-2]), Tail(to_tensor, normalize, mean, std)


def _maybe_to_tensor_call() -> Callable | None:
    try:
        from open_clip.transform import MaybeToTensor
    except ImportError:  # an older open_clip: plain ToTensor
        return None
    return MaybeToTensor.__call__


def as_uint8(image: object, tail: Tail) -> torch.Tensor | None:
    """A PIL image, or a uint8 (array [H, W(, C)], mode) pair as InputCache keeps one, of the tail's channel
    count as uint8 [C, H, W]; None for anything ToTensor treats otherwise (other modes, tensors), which then
    takes the per-sample path."""
    if isinstance(image, tuple) and len(image) == 2 and isinstance(image[0], np.ndarray):
        array, mode = image
        if array.dtype != np.uint8:
            return None
    elif isinstance(image, Image.Image):
        array, mode = None, image.mode
    else:
        return None
    channels = {"RGB": 3, "L": 1}.get(mode, 0)
    if channels != len(tail.mean):
        return None
    if array is None:
        array = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], channels)).permute(2, 0, 1)


def finish(images: list[torch.Tensor], tail: Tail) -> torch.Tensor:
    """uint8 [C, H, W] images of one size -> float [n, C, H, W], as ToTensor then Normalize make each."""
    batch = torch.stack(images).to(torch.get_default_dtype()).div_(255)
    mean = torch.as_tensor(tail.mean, dtype=batch.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(tail.std, dtype=batch.dtype).view(1, -1, 1, 1)
    return batch.sub_(mean).div_(std)


def finish_all(heads: list[object], tail: Tail) -> list[torch.Tensor]:
    """The tail on each of `heads` (what the steps before it made: PIL images or InputCache's pairs): those of
    one size that as_uint8 takes, as one batch; any other alone, by the transform's own two steps."""
    out: list[torch.Tensor | None] = [None] * len(heads)
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for j, head in enumerate(heads):
        pixels = as_uint8(head, tail)
        if pixels is None:
            out[j] = tail(Image.fromarray(*head) if isinstance(head, tuple) else head)
        else:
            by_shape.setdefault(tuple(pixels.shape), []).append((j, pixels))
    for group in by_shape.values():
        batch = finish([pixels for _, pixels in group], tail)
        for row, (j, _) in enumerate(group):
            out[j] = batch[row]
    return out  # type: ignore[return-value]  (every slot filled)
