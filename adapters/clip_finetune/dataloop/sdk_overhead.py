"""dtlpy spends most of a short API call describing its caller, and never reads the description: its
`token_expired_decorator` (dtlpy/services/api_client.py, on every request) runs `inspect.stack()`, which reads
the source lines of every frame on the stack and, for a frame whose file it cannot map to a module (code run from
a string: runpy, execnet, a platform runner), walks all of sys.modules (~4,000 with torch loaded). The frame it
keeps goes into a `stack` argument whose only reader is commented out. Measured in this package's test suite:
12 ms a call with one such frame, 0.67 ms without, and most of a stand-in platform test's time.

`skip_caller_source()` gives that module an `inspect` whose `stack()` returns the same frames as
`inspect.stack(context=0)` would (frame, file, line, function; no source lines), for the decorator's two.
It changes nothing else; a dtlpy that stops calling `inspect.stack` there is left as it is.
"""

from __future__ import annotations

import inspect
import sys
import types


def caller_frames(context: int = 1) -> list[inspect.FrameInfo]:
    """The calling frame and its caller as inspect.stack(0) describes them, without reading any source."""
    frame, frames = sys._getframe(1), []
    while frame is not None and len(frames) < 2:
        code = frame.f_code
        frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
        frame = frame.f_back
    return frames


def skip_caller_source() -> bool:
    """Make dtlpy's per-request caller capture cheap; False where this dtlpy does not do it the known way."""
    from dtlpy.services import api_client

    current = getattr(api_client, "inspect", None)
    if current is inspect:
        api_client.inspect = types.SimpleNamespace(**{**vars(inspect), "stack": caller_frames})
        return True
    return getattr(current, "stack", None) is caller_frames  # done already
