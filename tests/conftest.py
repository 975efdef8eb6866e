"""Shared test paths. toyjax itself comes from the installed package (`pip install -e .`), not from sys.path edits."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"  # real English text; tests that read it skip when it is absent
