"""Headless Chromium for tests: Debian's ``chromium`` driven by Playwright for Python (no browser download).

Fixtures (import them in a test module: ``from browser import browser, page  # noqa: F401``):

- ``browser`` (session scope): one Chromium launched with ``executable_path`` = the system chromium,
  headless; skips the test when chromium or the ``playwright`` package is missing (Makefile
  ``debian-test-deps`` installs the first, the ``test`` extra the second).
- ``page``: a fresh context and page with a 1600x1000 viewport whose console errors, page errors
  (uncaught exceptions) and failed requests are collected in ``page.console_log`` (a :class:`ConsoleLog`).

- ``screenshots`` (session scope): the folder screenshots go to: ``PACS_AI_SCREENSHOTS`` when set
  (relative to the repository root, e.g. ``PACS_AI_SCREENSHOTS=docs/images`` to regenerate the committed
  pictures), else a folder of the session's pytest temporary directory, so a test run leaves the working
  tree clean.

Use ``page.console_log.assert_clean()`` at the end of a test to fail on any console error.

Also: :func:`launch_chromium` for scripts (e.g. writing screenshots outside pytest).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "CHROMIUM",
    "VIEWPORT",
    "ConsoleLog",
    "browser",
    "browser_unavailable",
    "launch_chromium",
    "page",
    "screenshots",
]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS_ENV = "PACS_AI_SCREENSHOTS"
"""Environment variable naming where browser tests write their screenshots (e.g. docs/images)."""

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
VIEWPORT = {"width": 1600, "height": 1000}
"""The window size the viewers are checked at (issue 15)."""

# Running as root in a container needs --no-sandbox; /dev/shm is small in containers.
_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if CHROMIUM is None:
        return "chromium is not installed (Debian package chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return None


def launch_chromium(playwright: Any) -> Any:
    """Launch the system chromium headless through a started ``sync_playwright()`` object."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=_ARGS)


@dataclass
class ConsoleLog:
    """What a page reported: console messages of type error, uncaught page errors, failed requests."""

    errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("requestfailed", lambda req: self.failed_requests.append(f"{req.method} {req.url}: {req.failure}"))

    def _on_console(self, msg: Any) -> None:
        self.messages.append(f"{msg.type}: {msg.text}")
        if msg.type == "error":
            self.errors.append(msg.text)

    def assert_clean(self) -> None:
        """Fail when the page logged a console error or threw an uncaught exception."""
        problems = [f"console error: {e}" for e in self.errors] + [f"page error: {e}" for e in self.page_errors]
        assert not problems, "the page reported errors:\n" + "\n".join(problems)


# Each test module that imports the fixture gets its own session-scoped instance of it, and a second
# sync_playwright() while the first one runs fails ("Sync API inside the asyncio loop"): the instances
# share one Playwright and one Chromium, closed when the last instance is torn down.
_SHARED: dict[str, Any] = {"users": 0}


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless system Chromium for the session (skips when chromium or playwright is missing)."""
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    if _SHARED["users"] == 0:
        from playwright.sync_api import sync_playwright

        pw = sync_playwright().start()
        try:
            _SHARED["browser"], _SHARED["playwright"] = launch_chromium(pw), pw
        except BaseException:
            pw.stop()
            raise
    _SHARED["users"] += 1
    try:
        yield _SHARED["browser"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            try:
                _SHARED.pop("browser").close()
            finally:
                _SHARED.pop("playwright").stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A new page (own context, 1600x1000 viewport); ``page.console_log`` collects its errors."""
    context = browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    log = ConsoleLog()
    log.attach(tab)
    tab.console_log = log
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots are written: ``$PACS_AI_SCREENSHOTS`` (relative to the repository root) when set,
    else a fresh folder under the session's temporary directory (the working tree stays clean)."""
    chosen = os.environ.get(SCREENSHOTS_ENV, "").strip()
    if not chosen:
        return tmp_path_factory.mktemp("screenshots")
    folder = Path(chosen) if Path(chosen).is_absolute() else REPO / chosen
    folder.mkdir(parents=True, exist_ok=True)
    return folder
