"""Strategies that simplify a word outside the top-word vocabulary to a word inside it.

A strategy has `fit(word_counts, top_words, documents)`, `simplify_occurrences(occurrences) -> list[str]`
(each occurrence is (sentence words, index of the rare word)), and `state()` / `from_state(state)` so the
choice is saved with the tokenizer. Static strategies ignore the sentence; "contextual" (BERT, in
toyjax/tokenizers/contextual.py) reads it. This module owns the registry: "contextual" is imported on first use
(it loads JAX and the BERT package), and it does not import this module back.
"""

from __future__ import annotations

import collections

import numpy as np

from toyjax.tokenizers.words import UNK, word_class

STRATEGIES: dict[str, type] = {}


def register(name: str):
    def wrap(cls):
        STRATEGIES[name] = cls
        cls.name = name
        return cls

    return wrap


def get_strategy(name: str) -> type:
    """Returns the strategy class registered under name; "contextual" is imported and registered on first use."""
    if name == "contextual" and name not in STRATEGIES:
        from toyjax.tokenizers.contextual import ContextualSimplifier

        STRATEGIES[name] = ContextualSimplifier
    if name not in STRATEGIES:
        raise ValueError(f"unknown simplification strategy '{name}'; choose from {', '.join(sorted(STRATEGIES) + ['contextual'])}")
    return STRATEGIES[name]


class StaticStrategy:
    """A fixed rare-word -> top-word table, saved with the tokenizer."""

    def __init__(self, mapping: dict[str, str] | None = None):
        self.mapping = dict(mapping or {})

    def simplify_occurrences(self, occurrences: list[tuple[list[str], int]]) -> list[str]:
        return [self.mapping.get(words[index], UNK) for words, index in occurrences]

    def state(self) -> dict:
        return {"mapping": self.mapping}

    @classmethod
    def from_state(cls, state: dict):
        return cls(state["mapping"])


@register("unk")
class UnkStrategy(StaticStrategy):
    """Every rare word becomes <unk>: the plain top-word tokenizer."""

    def fit(self, word_counts, top_words, documents) -> None:
        self.mapping = {}


def ppmi_context_vectors(documents, rows: list[str], contexts: list[str], window: int = 2, alpha: float = 0.75):
    """Returns L2-normalised positive-PMI vectors [len(rows), len(contexts)] from ±window co-occurrences.

    PPMI with context-distribution smoothing (alpha = 0.75) is the count-based distributional similarity of
    Levy, Goldberg & Dagan (2015): deterministic, cheap, and about as good as word2vec on similarity tasks.
    """
    row_id = {w: i for i, w in enumerate(rows)}
    ctx_id = {w: i for i, w in enumerate(contexts)}
    n_ctx = len(contexts)
    codes = []
    for words in documents:
        r = np.fromiter((row_id.get(w, -1) for w in words), np.int64, len(words))
        c = np.fromiter((ctx_id.get(w, -1) for w in words), np.int64, len(words))
        for offset in range(1, window + 1):
            for a, b in ((r[:-offset], c[offset:]), (r[offset:], c[:-offset])):
                keep = (a >= 0) & (b >= 0)
                codes.append(a[keep] * n_ctx + b[keep])
    counts = np.zeros((len(rows), n_ctx), np.float32)
    if codes:
        flat, freq = np.unique(np.concatenate(codes), return_counts=True)
        counts.reshape(-1)[flat] = freq
    total = counts.sum()
    ctx_p = counts.sum(0) ** alpha
    ctx_p /= max(ctx_p.sum(), 1e-12)
    row_p = counts.sum(1, keepdims=True) / max(total, 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts / max(total, 1e-12) / (row_p * ctx_p))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0).astype(np.float32)
    norms = np.linalg.norm(ppmi, axis=1, keepdims=True)
    return ppmi / np.maximum(norms, 1e-12)


@register("nearest")
class NearestStrategy(StaticStrategy):
    """Each rare word becomes the top word whose PPMI context vector is most cosine-similar.

    "puppy" shares contexts ("the little _ ran", "her _ barked") with "dog", so it maps there. Candidates are
    restricted to the rare word's class (word / number / symbol). A rare word with no usable context (all its
    neighbours are rare) falls back to <unk>.
    """

    max_contexts = 1000

    def fit(self, word_counts: collections.Counter, top_words: list[str], documents) -> None:
        top = set(top_words)
        rare = [w for w, _ in word_counts.most_common() if w not in top]
        if not rare:
            self.mapping = {}
            return
        contexts = top_words[: self.max_contexts]
        vectors = ppmi_context_vectors(documents, top_words + rare, contexts)
        top_vecs, rare_vecs = vectors[: len(top_words)], vectors[len(top_words):]
        classes = np.array([word_class(w) for w in top_words])
        self.mapping = {}
        for start in range(0, len(rare), 2048):
            block = rare[start:start + 2048]
            sims = rare_vecs[start:start + 2048] @ top_vecs.T  # [block, top]
            for row, word in enumerate(block):
                allowed = classes == word_class(word)
                if not allowed.any() or not rare_vecs[start + row].any():
                    self.mapping[word] = UNK
                    continue
                scores = np.where(allowed, sims[row], -np.inf)
                self.mapping[word] = top_words[int(np.argmax(scores))]
