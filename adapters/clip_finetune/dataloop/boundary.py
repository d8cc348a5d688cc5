"""The boundary of the Dataloop adapter: what the platform calls on ClipAdapter fails with one clean message (the
execution's error) for bad input: our errors as they are, and the system refusing a file (missing, no
permission, a full disk) as an InputError naming it (errors.user_error). Anything else is a bug and keeps its
traceback."""

from __future__ import annotations

from typing import TypeVar

from adapters.clip_finetune.errors import at_boundary

# The entry points the platform (dtlpy's runner and the manifest's functions) calls on the adapter.
PLATFORM_CALLS = ("load_from_model", "load", "save", "save_to_model", "convert_from_dtlpy", "train", "embed_items",
                  "evaluate_model", "evaluate")
T = TypeVar("T", bound=type)


def guarded(cls: T) -> T:
    """Put each of `cls`'s own PLATFORM_CALLS under errors.user_errors (functools.wraps keeps what dtlpy's
    function decorator recorded on it, and its signature)."""
    for name in PLATFORM_CALLS:
        if name in vars(cls):
            setattr(cls, name, at_boundary(vars(cls)[name]))
    return cls
