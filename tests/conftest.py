"""Shared test paths, the browser fixture and the session's compilation cache. toyjax itself comes from the
installed package (`pip install -e .`), not from sys.path edits."""

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"  # real English text; tests that read it skip when it is absent

CHROMIUM = Path("/usr/bin/chromium")

_OWN_CACHE = None


def pytest_configure(config):
    """Gives the session one fresh XLA compilation cache, shared by the xdist workers and every subprocess a test
    starts (they inherit the environment): the tiny test models compile to the same programs in many tests. It is
    made empty for each session and removed after it, so no compiled program carries over between runs."""
    global _OWN_CACHE
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # an xdist worker (or a caller's own choice): use it as given
        return
    _OWN_CACHE = tempfile.mkdtemp(prefix="toyjax-test-xla-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    if "jax" in sys.modules:  # imported already (a plugin): set it in this process too
        import jax

        jax.config.update("jax_compilation_cache_dir", _OWN_CACHE)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
