"""What every module of the stand-in shares: ids, timestamps, the test user and its token, JSON merging."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from typing import Any

API_PREFIX = "/api/v1"
TEST_USER_EMAIL = "tester@loopback.local"
JSON = dict[str, Any]

_id_counter = itertools.count(1)
_id_lock = threading.Lock()


def new_id() -> str:
    """A 24-hex id shaped like a Mongo ObjectId and increasing, so "sort by id" is creation order.

    dtlpy splits large queries by id ranges (Filters._get_split_filters parses ids as ObjectIds), so ids
    must be valid 12-byte hex.
    """
    with _id_lock:
        return f"{int(time.time()):08x}{next(_id_counter):016x}"


def make_token(email: str = TEST_USER_EMAIL, ttl_s: int = 10 * 365 * 24 * 3600) -> str:
    """An unsigned-looking JWT with a future `exp`: dtlpy decodes it without checking the signature."""

    def b64(obj: Any) -> str:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    payload = {"email": email, "sub": email, "exp": int(time.time()) + ttl_s, "iat": int(time.time())}
    return ".".join([b64({"alg": "HS256", "typ": "JWT"}), b64(payload), b64(b"loopback-signature")])


def _now() -> str:
    """An ISO timestamp with milliseconds, as the platform writes them."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _deep_merge(base: JSON, extra: JSON) -> JSON:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base
