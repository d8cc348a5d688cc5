"""Pointing the real dtlpy client at a LoopbackPlatform, and the `platform` fixture that does it per test.

dtlpy is imported inside the functions, so importing the stand-in does not import dtlpy (conftest.py sets
DATALOOP_PATH first).
"""

from __future__ import annotations

import contextlib
import os
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from .common import make_token
from .server import LoopbackPlatform


def _fast_session() -> Any:
    """dtlpy's requests session with its retry policy kept but its back-off removed.

    dtlpy retries connection errors and 501-511 five times with backoff_factor=1 (about 30 s before an
    error surfaces); tests keep two retries and no sleeping. 500 is not retried, as in dtlpy.
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    retry = Retry(
        total=2,
        read=2,
        connect=2,
        backoff_factor=0,
        allowed_methods=False,
        raise_on_status=False,
        status_forcelist=(501, 502, 503, 504, 505, 506, 507, 508, 510, 511),
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=64, pool_connections=64)
    session.mount("http://", adapter)
    return session


def _time_with_sleep(sleep: Any) -> types.SimpleNamespace:
    """The time module with another sleep, for one dtlpy module."""
    shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    shim.sleep = sleep
    return shim


@contextlib.contextmanager
def dtlpy_pointed_at(server: LoopbackPlatform, skip_sdk_sleeps: bool = True) -> Iterator[None]:
    """Point the already-imported (or not yet imported) dtlpy client at `server`, then restore it.

    Works when another test imported dtlpy earlier in the same process: dtlpy caches the gate URL on first
    use, so this registers the server as an environment, `setenv`s it, clears that cache, and also sets
    INTERNAL_REQUESTS_URL (which wins over the environment in ApiClient.base_gate_url).
    `skip_sdk_sleeps` removes the fixed 2 s `time.sleep` dtlpy does after every dataset export request
    (Datasets._export_recursive), which would add 2 s per downloaded subset, and shortens the back-off of
    execution.wait() and pipeline_execution.wait() (2, 4, 8 ... 30 s between polls) to 50 ms.
    """
    import dtlpy as dl
    from dtlpy.repositories import datasets as datasets_module
    from dtlpy.repositories import executions as executions_module
    from dtlpy.repositories import pipeline_executions as pipeline_executions_module

    client = dl.client_api
    saved_env, saved_session = client.environment, client.session
    saved_internal = os.environ.get("INTERNAL_REQUESTS_URL")
    saved_progress = client.verbose.disable_progress_bar
    polling = (executions_module, pipeline_executions_module)
    saved_time = datasets_module.time
    url = server.base_url
    token = make_token()
    client.add_environment(
        environment=url,
        alias=f"loopback-{server.port}",
        token=token,
        gate_url=url,
        url=f"http://127.0.0.1:{server.port}/",
        verify_ssl=True,
    )
    os.environ["INTERNAL_REQUESTS_URL"] = url
    client.setenv(url)
    client.token = token
    client._ApiClient__gate_url_for_requests = None  # dtlpy caches the gate URL on first request
    client.session = _fast_session()
    client.verbose.disable_progress_bar = True
    if skip_sdk_sleeps:
        datasets_module.time = _time_with_sleep(lambda seconds: None)
        for module in polling:
            module.time = _time_with_sleep(lambda seconds: time.sleep(min(seconds, 0.05)))
    try:
        yield
    finally:
        datasets_module.time = saved_time
        for module in polling:
            module.time = time
        if saved_internal is None:
            os.environ.pop("INTERNAL_REQUESTS_URL", None)
        else:
            os.environ["INTERNAL_REQUESTS_URL"] = saved_internal
        client.verbose.disable_progress_bar = saved_progress
        # Not setenv(): it checks the token and may try to renew it over the network.
        client.environment = saved_env
        client._token = None
        client._ApiClient__gate_url_for_requests = None
        with contextlib.suppress(Exception):
            client.session.close()
        client.session = saved_session


@pytest.fixture(name="platform")
def platform_fixture() -> Iterator[LoopbackPlatform]:
    """A fresh, empty loopback platform with dtlpy pointed at it (function scope: ~10 ms to start)."""
    with LoopbackPlatform() as server, dtlpy_pointed_at(server):
        yield server
