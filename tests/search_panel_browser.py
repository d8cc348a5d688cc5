"""The search panel's script (panels/tuned-clip-search/search.js) run in a real headless Chromium, with a fake of
the panel runtime's `dl` object (tests/panel_runtime/fake_dl.js) that talks to a LoopbackPlatform over HTTP.

Playwright (PyPI) drives Debian's Chromium (`/usr/bin/chromium`; no browser download); where either is missing
`panel_browser()` skips the test, saying which and how to get it (.ci/run installs both).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import REPO
from loopback_platform import LoopbackPlatform, make_token

PANEL_SCRIPT = REPO / "panels" / "tuned-clip-search" / "search.js"
FAKE_DL = REPO / "tests" / "panel_runtime" / "fake_dl.js"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@contextlib.contextmanager
def panel_browser() -> Iterator[Any]:
    """A headless Chromium (Playwright's Browser), or a skip saying what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the test extra has it)")
    executable = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if executable is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def run_panel(browser: Any, server: LoopbackPlatform, project_id: str, dataset_id: str, form: dict[str, str],
              items_query: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the panel's run(form, itemsQuery) returns in the browser of `dataset_id`, and the events it sent:
    {"query": ..., "events": [...], "calls": ["GET /datasets/...", ...], "ms": how long run() took}."""
    services = {s["name"]: s["id"] for s in server.services.values() if s["projectId"] == project_id}
    config = {"baseUrl": server.base_url, "token": make_token(), "projectId": project_id, "datasetId": dataset_id,
              "services": services}
    page = browser.new_page()
    page.route("**/favicon.ico", lambda route: route.fulfill(status=204))  # the browser's, not the panel's
    try:
        page.goto(f"{server.base_url}/projects/{project_id}")  # the stand-in's origin: fetch needs no CORS
        page.add_script_tag(content=FAKE_DL.read_text())
        page.add_script_tag(content=PANEL_SCRIPT.read_text())
        return page.evaluate(
            """async ([config, form, itemsQuery]) => {
                window.dl = makeFakeDl(config);
                const started = performance.now();
                const query = await run(form, itemsQuery);
                const ms = performance.now() - started;
                return {query: query, events: window.dlEvents, calls: window.dlCalls, ms: ms};
            }""",
            [config, form, items_query])
    finally:
        page.close()
