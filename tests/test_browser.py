"""The shared browser fixture (tests/support/browser.py): the system Chromium runs, renders, and reports console errors."""

from __future__ import annotations

import pytest

from support.browser import ConsoleLog, browser, page  # noqa: F401

pytestmark = [pytest.mark.browser]


def test_page_renders_and_collects_console_errors(page) -> None:  # noqa: F811
    with page.expect_event("pageerror"):
        page.set_content(
            "<h1 id=t>pacs-ai</h1><script>console.log('fine'); console.error('boom');"
            "setTimeout(() => { throw new Error('late'); }, 0)</script>"
        )
    assert page.inner_text("#t") == "pacs-ai"
    assert page.viewport_size == {"width": 1600, "height": 1000}
    assert page.console_log.errors == ["boom"]
    assert any("late" in e for e in page.console_log.page_errors)
    with pytest.raises(AssertionError, match="boom"):
        page.console_log.assert_clean()


def test_clean_log_passes() -> None:
    ConsoleLog(messages=["log: fine"]).assert_clean()
