"""Headless Chromium for the tests: Debian's ``/usr/bin/chromium`` driven by Playwright's Python API (no browser
download). ``.ci/run`` installs the browser with apt; elsewhere the browser tests skip unless
``MDM_PRIME_REQUIRE_BROWSER=1`` (CI sets it), where a missing browser is a failure."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

# Flags of a headless Chromium on a machine with no network: without the background-networking ones, Chromium
# keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return os.environ.get("MDM_PRIME_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page(viewport=(1000, 700)):
    """A fresh page of a headless Chromium; skips (or fails, under MDM_PRIME_REQUIRE_BROWSER=1) without one."""
    executable = chromium_path()
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is None and executable is None:
        missing = "no Chromium found (apt-get install chromium, or set MDM_PRIME_CHROMIUM)"
    if missing is not None:
        if os.environ.get("MDM_PRIME_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MDM_PRIME_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            dialogs = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.dialogs = dialogs
            yield page
        finally:
            browser.close()
