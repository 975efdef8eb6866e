"""A small formal language with nesting: arithmetic, let-bindings and conditionals, one program per document.

    calc let x = 4 in ( x + 2 ) * x ;
    calc if 3 < y then 7 else 2 - 1 ;      (names are bound by an enclosing let when the generator writes them)

Symbols are separated by spaces, so a word-level tokenizer reads each one as one token. The grammar the
documents follow is toyjax.grammar.DEFAULT_GRAMMAR (tests check every generated document parses under it).
"""

from __future__ import annotations

import numpy as np

NAMES = ("x", "y", "z", "n", "m")
MAX_NUMBER = 20
MAX_NESTING = 3  # let / if / parentheses inside each other


def generate_documents(n: int, seed: int = 0, max_nesting: int = MAX_NESTING) -> list[str]:
    """Returns n programs, the same for the same (n, seed, max_nesting)."""
    rng = np.random.default_rng([seed, 6])
    return ["calc " + " ".join(_expr(rng, max_nesting, ())) + " ;" for _ in range(n)]


def _expr(rng, nesting: int, scope: tuple[str, ...]) -> list[str]:
    roll = rng.random()
    if nesting > 0 and roll < 0.25:
        name = NAMES[rng.integers(len(NAMES))]
        return ["let", name, "=", *_expr(rng, nesting - 1, scope), "in", *_expr(rng, nesting - 1, (*scope, name))]
    if nesting > 0 and roll < 0.35:
        compare = ["<", ">", "="][rng.integers(3)]
        return ["if", _value(rng, scope), compare, _value(rng, scope),
                "then", *_expr(rng, nesting - 1, scope), "else", *_expr(rng, nesting - 1, scope)]
    return _sum(rng, nesting, scope)


def _sum(rng, nesting, scope) -> list[str]:
    words = _product(rng, nesting, scope)
    for _ in range(rng.choice(3, p=[0.5, 0.35, 0.15])):
        words += ["+" if rng.random() < 0.6 else "-", *_product(rng, nesting, scope)]
    return words


def _product(rng, nesting, scope) -> list[str]:
    words = _atom(rng, nesting, scope)
    if rng.random() < 0.3:
        words += ["*", *_atom(rng, nesting, scope)]
    return words


def _atom(rng, nesting, scope) -> list[str]:
    roll = rng.random()
    if nesting > 0 and roll < 0.15:
        return ["(", *_expr(rng, nesting - 1, scope), ")"]
    return [_value(rng, scope)]


def _value(rng, scope) -> str:
    if scope and rng.random() < 0.5:
        return scope[rng.integers(len(scope))]
    return str(rng.integers(MAX_NUMBER + 1))
