"""Debian's headless Chromium for the browser tests: where it is, and the flags this closed network needs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    """Debian's Chromium; ``CXR_TRIAGE_CHROMIUM`` names another binary (a missing one counts as no Chromium)."""
    if "CXR_TRIAGE_CHROMIUM" in os.environ:
        chosen = os.environ["CXR_TRIAGE_CHROMIUM"]
        return chosen if Path(chosen).is_file() else None
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def sync_api():
    """playwright's sync API; without it the browser tests skip, except in CI, where they fail."""
    try:
        from playwright import sync_api as api
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright (python) is not installed", allow_module_level=True)
    return api


@contextmanager
def launched() -> Iterator[object]:
    """Headless Chromium under playwright; without a Chromium binary the test skips, except in CI (.ci/run installs
    Debian's package), where it fails."""
    path = chromium_path()
    if path is None:
        message = "no chromium binary found (install Debian's `chromium` package)"
        if IN_CI:
            pytest.fail(f"{message}; CI must run the browser tests")
        pytest.skip(message)
    with sync_api().sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
