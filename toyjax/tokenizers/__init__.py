"""Tokenizers: top-word (with rare-word simplification) and phrase tokens on top of it."""

from __future__ import annotations

import json
from pathlib import Path

from toyjax.tokenizers.topword import META_FILE, TopWordTokenizer

TOKENIZER_KINDS: dict[str, type] = {"topword": TopWordTokenizer}

try:  # the phrase tokenizer lands separately; keep the top-word tokenizer importable without it
    from toyjax.tokenizers.phrases import PhraseTokenizer

    TOKENIZER_KINDS["phrase"] = PhraseTokenizer
except ImportError:  # pragma: no cover
    PhraseTokenizer = None


def load_tokenizer(path: str | Path):
    """Loads any saved toyjax tokenizer, dispatching on the kind recorded beside it."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a saved toyjax tokenizer: {META_FILE} is missing")
    kind = json.loads(meta_path.read_text()).get("kind")
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; known: {', '.join(TOKENIZER_KINDS)}")
    return TOKENIZER_KINDS[kind].load(path)


__all__ = ["TopWordTokenizer", "PhraseTokenizer", "TOKENIZER_KINDS", "load_tokenizer"]
