"""What the browser tests share: where chromium is, how it is launched, where screenshots go.

The browser is the system's (``/usr/bin/chromium``, installed by the Makefile's test set-up),
never one Playwright downloads. Every test skips, saying why, when that browser or the
``playwright`` package is missing. Screenshots go under build/artifacts/ (gitignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "artifacts"
#: Flags that run Debian's chromium here: no sandbox (tests run as root in a container), no GPU,
#: and none of its background traffic (updates, sync, QUIC probes) on a machine without them.
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
#: Bound on any one wait in the browser: well above what a page update takes (milliseconds),
#: and short enough that a broken page fails the test instead of hanging the suite.
WAIT_MS = 20_000
#: A desktop trading screen's size, for the screenshots.
VIEWPORT = {"width": 1440, "height": 900}


def skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return (
            f"{CHROMIUM} is absent: install Debian's chromium (`apt-get install chromium`; "
            "`make test` does so when run as root)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return None


def screenshot(tab: Any, name: str) -> Path:
    """Save the whole page under build/artifacts/ and return the path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    return path
