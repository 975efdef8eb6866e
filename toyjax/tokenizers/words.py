"""What every simplification strategy shares: the unknown-word token and the coarse class of a word."""

from __future__ import annotations

UNK = "<unk>"


def word_class(word: str) -> str:
    """Returns the coarse kind of a token ("word", "number" or "symbol"), so a rare number never becomes a word or
    a punctuation mark."""
    if word[:1].isalpha():
        return "word"
    if word[:1].isdigit():
        return "number"
    return "symbol"
