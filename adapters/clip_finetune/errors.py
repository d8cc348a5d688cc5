"""The project's exception types, and the one translation every face (CLI, Python API, Dataloop adapter) applies at
its boundary: our errors, and the operating system refusing a file a user named (missing, no permission, a folder
where a file belongs, a full disk), become one clean message; anything else is a bug of ours and stays a
traceback."""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Setting(NamedTuple):
    """A setting an error's advice names: a configuration key or a use case's argument (`name`: "pretrained",
    "resume", "out"), with the value advised (None: the setting itself). Each face says it in its own terms: the
    CLI as a flag (cli/advice.py), the Python API and the Dataloop app as `name=value`."""

    name: str
    value: str | None = None
    plain: str | None = None  # how the Python API and the app say it, where `name=value` reads wrong (a use case)

    def neutral(self) -> str:
        if self.plain is not None:
            return self.plain
        return self.name if self.value is None else f"{self.name}={self.value}"


class ClipFinetuneError(Exception):
    """Base class of every error this package raises on purpose (bad config, bad data, bad model).

    `advice` names the settings the message mentions: the message holds {key} where each is said, str() says
    them as `name=value` and `render` as a face wants (the engine never spells a command-line flag)."""

    def __init__(self, *args: object, advice: Mapping[str, Setting] | None = None) -> None:
        self.advice = dict(advice or {})
        self.template = str(args[0]) if args else ""
        super().__init__(*((self.render(Setting.neutral), *args[1:]) if self.advice else args))

    def render(self, say: Callable[[Setting], str]) -> str:
        """The message with each advised setting said by `say`."""
        text = self.template
        for key, setting in self.advice.items():
            text = text.replace("{" + key + "}", say(setting))
        return text if self.advice else str(self)


class ConfigError(ClipFinetuneError, ValueError):
    """A hyperparameter configuration is invalid; the message has one line per offending field."""


class DataError(ClipFinetuneError):
    """Input data is unusable (no pairs, unreadable file, unknown layout)."""


class ModelError(ClipFinetuneError):
    """A model cannot be built, loaded or saved (unknown architecture, missing weights)."""


class InputError(ClipFinetuneError):
    """The system refused a file or folder a user named: missing, no permission, a folder given for a file, a full
    disk. Made by `user_error` from the OSError."""


_HINTS = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EISDIR: "a folder was given where a file is expected",
    errno.ENOTDIR: "a file was given where a folder is expected",
    errno.EEXIST: "it already exists; choose another name",
    errno.ELOOP: "it is a symlink loop",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EDQUOT: "free some disk space or write elsewhere",
    errno.EFBIG: "the file-size limit (ulimit -f) was reached; raise it or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOTEMPTY: "the folder is not empty",
}
_ANYWHERE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # the machine's fault whichever file it was


def user_error(e: BaseException) -> ClipFinetuneError | None:
    """The clean error a face shows for `e`: `e` itself when it is ours, an InputError for the system refusing a
    named file (or a full or read-only disk), None for anything else."""
    if isinstance(e, ClipFinetuneError):
        return e
    if not isinstance(e, OSError) or isinstance(e, BrokenPipeError | ConnectionError | TimeoutError):
        return None
    if e.filename is None and e.errno not in _ANYWHERE:
        return None
    names = " -> ".join(short_name(n) for n in (e.filename, e.filename2) if n is not None)
    reason = (e.strerror or str(e)).rstrip(".").lower()
    hint = _HINTS.get(e.errno or -1)
    text = f"{names}: {reason}" if names else reason
    return InputError(f"{text}; {hint}" if hint else text)


def short_name(name: Any) -> str:
    """repr() of a file name for a message, its middle cut when it is long (a 5,000-character name is not read)."""
    text = repr(str(name) if not isinstance(name, bytes) else name.decode(errors="replace"))
    return text if len(text) <= 200 else f"{text[:120]}...{text[-60:]} ({len(text)} characters)"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise what `user_error` knows as a ClipFinetuneError (chained to the original); let the rest through."""
    try:
        yield
    except ClipFinetuneError:
        raise
    except OSError as e:
        clean = user_error(e)
        if clean is None:
            raise
        raise clean from e


def at_boundary(fn: F) -> F:
    """`fn` run under `user_errors`: a public function of a face."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
