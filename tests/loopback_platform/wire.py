"""What crosses the wire: the recorded request (`Call`), a reply, an HTTP error, and the request bodies dtlpy
sends that need decoding (chunked transfer encoding, multipart forms)."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Call:
    """One recorded request. `path` has no /api/v1 prefix and no query string."""

    method: str
    path: str
    query: dict[str, list[str]]
    json: Any = None
    form: dict[str, Any] | None = None  # multipart fields; file fields as their byte count
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    fault: str | None = None


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Reply:
    status: int = 200
    body: Any = None  # JSON-able, or bytes for streams
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # send the full Content-Length, then only this many bytes, and close (a cut stream)


def _read_chunked(rfile: io.BufferedIOBase) -> bytes:
    """De-chunk a `Transfer-Encoding: chunked` body (aiohttp streams uploads that way)."""
    out = bytearray()
    while True:
        line = rfile.readline()
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()  # CRLF after each chunk


def _parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """{field: (filename or None, bytes)} of a multipart/form-data body."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise _HttpError(400, "multipart body without boundary")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + match.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.partition(b"\r\n\r\n")
        disposition = head.decode("utf-8", "replace")
        name = re.search(r'name="([^"]*)"', disposition)
        filename = re.search(r'filename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, content[:-2])  # strip CRLF
    return fields
