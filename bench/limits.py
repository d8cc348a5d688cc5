"""What the hardware allows a model: its matrix products alone, and its FLOPs.

- `matmul_limit`: every matrix product of one training step (or forward pass) of the model is recorded with its
  shapes, strides and dtype (a TorchDispatchMode), then the products alone are replayed on fresh tensors and
  timed. The step cannot run faster than that: it is the "GEMM of the model's shapes" limit, in the dtypes the
  step ran them in (fp32; bf16 for a step run under bf16 autocast).
- `step_flops`: torch's FlopCounterMode count of the same step (for model-FLOPs utilisation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from statistics import median
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten
# products that carry a model's FLOPs; everything else (norms, activations, softmax, the optimizer) is overhead
_SDPA = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
              aten.convolution_backward.default,
              *(getattr(aten, name + suffix).default for name in _SDPA for suffix in ("", "_backward"))}

Spec = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMUL_OPS:
            self.ops.append((func, _specs(args), _specs(kwargs)))
        return func(*args, **kwargs)


def _specs(x: Any) -> Any:
    """Tensors replaced by (shape, stride, dtype, device); other arguments kept."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
    if isinstance(x, list | tuple):
        return type(x)(_specs(v) for v in x)
    if isinstance(x, dict):
        return {k: _specs(v) for k, v in x.items()}
    return x


def _fresh(x: Any) -> Any:
    if isinstance(x, tuple) and x and x[0] == "tensor":
        _, shape, stride, dtype, device = x
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return t.normal_() if dtype.is_floating_point else t.zero_()
    if isinstance(x, list | tuple):
        return type(x)(_fresh(v) for v in x)
    if isinstance(x, dict):
        return {k: _fresh(v) for k, v in x.items()}
    return x


def record_matmuls(step: Callable[[], Any]) -> list[tuple[Any, tuple, dict]]:
    """The matrix products that `step()` runs (forward and backward), with their argument shapes."""
    with _Recorder() as rec:
        step()
    return rec.ops


def matmul_limit(step: Callable[[], Any], repeats: int = 3) -> float:
    """Seconds the matrix products of one `step()` take alone (median of `repeats` replays)."""
    ops = record_matmuls(step)
    calls = [(func, _fresh(args), _fresh(kwargs)) for func, args, kwargs in ops]
    sync = torch.cuda.synchronize if any(_on_cuda(a) for _, a, _ in calls) else (lambda: None)
    for func, args, kwargs in calls:  # warm-up: kernels chosen, caches filled
        func(*args, **kwargs)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for func, args, kwargs in calls:
                func(*args, **kwargs)
            sync()
            times.append(time.perf_counter() - t0)
    return median(times)


def _on_cuda(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


def step_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one `step()` (forward and backward), as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of a large square matrix product: what the device reaches at best in `dtype`."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / median(times)
