"""torch.compile (`compile: true`), with a way back: a module that cannot be compiled runs as it is, after one
warning that says why.

torch.compile compiles lazily, at the first call, so that is where it fails (no C++ compiler for the CPU
backend, no Triton for CUDA, an unsupported Python or operator): the first call is tried compiled and, if it
raises, the module's compiled call is removed and the call runs again uncompiled. An error that is not the
compiler's raises again from the uncompiled run, where it belongs.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch

log = logging.getLogger(__name__)


def compile_module(module: torch.nn.Module, what: str, **options: Any) -> torch.nn.Module:
    """Compile `module` in place (nn.Module.compile: the same object, the same state_dict keys); returns it.

    `options` go to torch.compile (tests pass backend="eager"). Where torch cannot compile at all, the module
    stays as it is and a warning says so.
    """
    if not torch._dynamo.is_dynamo_supported():
        log.warning("compile: torch.compile does not support this Python/platform; running %s uncompiled", what)
        return module
    module.compile(**options)
    module._compiled_call_impl = _FirstCallGuard(module, module._compiled_call_impl, what)
    return module


class _FirstCallGuard:
    """The compiled call of `module`; if the first call raises, warn and fall back to the uncompiled module."""

    def __init__(self, module: torch.nn.Module, compiled: Any, what: str) -> None:
        self.module, self.compiled, self.what = module, compiled, what
        self.proven = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.proven:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # torch raises assorted types (BackendCompilerFailed, InductorError, ...)
            log.warning("compile: torch.compile could not compile %s (%s)%s; running it uncompiled "
                        "(set compile: false to skip the attempt)", self.what, _reason(e), _hint(self.module))
            self.module._compiled_call_impl = None  # nn.Module.__call__ then runs the module as it is
            return self.module(*args, **kwargs)
        self.proven = True
        return out


def _reason(e: BaseException) -> str:
    """The root cause, one line: torch wraps the backend's own error (BackendCompilerFailed, InductorError)."""
    root = e
    while getattr(root, "inner_exception", None) or root.__cause__:
        root = getattr(root, "inner_exception", None) or root.__cause__
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0][:300]}" if lines else type(root).__name__


def _hint(module: torch.nn.Module) -> str:
    """The usual cause, where it can be seen: the backend's compiler is missing."""
    try:
        device = next(module.parameters()).device.type
    except StopIteration:
        return ""
    if device == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "; the CPU backend needs a C++ compiler (install g++)"
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "; the CUDA backend needs Triton (pip install triton)"
    return ""
