"""Shared test paths. toyjax itself comes from the installed package (`pip install -e .`), not from sys.path edits."""

import contextlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"  # real English text; tests that read it skip when it is absent

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def browser_page():
    """Returns open(html_path) -> context manager yielding (page, problems): a headless chromium page on the file
    and the console errors / page errors it raised (skips the test where chromium or playwright is missing)."""
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")

    @contextlib.contextmanager
    def open_page(path):
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page()
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(Path(path).as_uri())
            try:
                yield page, problems
            finally:
                browser.close()

    return open_page
