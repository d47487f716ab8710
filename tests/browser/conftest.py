"""Headless Chromium (Debian's ``chromium``, driven by playwright; nothing is downloaded) against real servers.

Screenshots of every page go to ``artifacts/screenshots/`` (override with ``CLUES_ARTIFACTS``) to be looked at.
Without a browser the tests skip with the reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CLUES_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("CLUES_ARTIFACTS", REPO / "artifacts")) / "screenshots"


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator:
    """A fresh browser context (its own cookies) and page; console errors fail the test.

    The page's Content Security Policy is bypassed here, because playwright's ``wait_for_function`` polls a string
    predicate with ``eval``, which the policy forbids; `strict_page` keeps the policy, and each dashboard's
    ``..._under_its_content_security_policy`` test loads its pages with it."""
    yield from _page(browser, bypass_csp=True)


@pytest.fixture
def strict_page(browser) -> Iterator:
    """`page` with the servers' Content Security Policy enforced: a violation is a console error, so it fails."""
    yield from _page(browser, bypass_csp=False)


def _page(browser, bypass_csp: bool) -> Iterator:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=bypass_csp)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.set_default_timeout(15_000)
    yield page
    context.close()
    # a 401/403/404 a test provokes on purpose logs "Failed to load resource"; anything else is a bug in a page
    real = [e for e in errors if "Failed to load resource" not in e]
    assert not real, f"browser errors: {real}"


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot as ``artifacts/screenshots/<name>.png``."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
