"""dataloop/sdk_overhead.py: dtlpy's per-request caller capture reads no source, and still names the caller."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("dtlpy")

from dtlpy.services import api_client  # noqa: E402

from adapters.clip_finetune.dataloop import sdk_overhead  # noqa: E402


class _Client:
    def token_expired(self) -> bool:
        return False

    @api_client.Decorators.token_expired_decorator
    def request(self, path: str, **kwargs):
        return path, kwargs["stack"]


def test_dtlpys_requests_name_their_caller_without_reading_any_source(monkeypatch) -> None:
    assert sdk_overhead.skip_caller_source()  # done on import of the dataloop package; a second call keeps it
    assert api_client.inspect.stack is sdk_overhead.caller_frames and inspect.stack is not sdk_overhead.caller_frames

    def no_source(*args, **kwargs):
        raise AssertionError("dtlpy's request read source files")

    for name in ("findsource", "getmodule", "getsourcefile"):
        monkeypatch.setattr(inspect, name, no_source)
    path, frame = _Client().request("/datasets")
    assert path == "/datasets"
    assert frame.function == "test_dtlpys_requests_name_their_caller_without_reading_any_source"
    assert frame.filename == __file__ and frame.code_context is None and frame.lineno > 0


def test_a_dtlpy_that_captures_its_caller_another_way_is_left_alone(monkeypatch) -> None:
    other = object()
    monkeypatch.setattr(api_client, "inspect", other)
    assert not sdk_overhead.skip_caller_source()
    assert api_client.inspect is other
