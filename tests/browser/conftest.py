"""Browser test fixtures: Debian's chromium driven by Playwright for Python, one profile per run,
a fresh tab per test (see support.py for the launch flags and the skip rule)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, WAIT_MS, skip_reason


# Package scope: the browser closes once the browser tests are done, not at the end of the
# whole suite (which runs for minutes after them on a shared machine).
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="cbk-chromium-"))
    with sync_playwright() as pw:
        # A persistent context is how Playwright takes a --user-data-dir of our choosing: a
        # new, empty profile per run.
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,  # type: ignore[arg-type]
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab; ``tab.errors`` collects the page's uncaught exceptions (a test checks it is
    empty: a page that throws is broken)."""
    tab = browser.new_page()
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.errors = errors
    try:
        yield tab
    finally:
        tab.close()
