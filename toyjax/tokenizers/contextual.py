"""The "contextual" simplification strategy: a rare word becomes the top word a masked LM finds most probable there.

    TopWordTokenizer.fit(texts, vocab_size=1024, simplify="contextual")

Each out-of-vocabulary occurrence is replaced by [MASK] in its sentence (the words around it, up to the
nearest sentence end, at most `window` words each side) and the candidates are the top words of the same
class (a rare word never becomes punctuation). The choice is the exact chain-rule argmax
(toyjax.bert.most_probable), batched with a progress bar and cached per context.

The masked LM must have an MLM head. The packaged all-MiniLM-L6-v2 has none, so point the strategy at an
adapted folder: `TOYJAX_BERT=runs/bert_adapt/hf` (written by `python launch.py bert-adapt`) or any BERT folder
with an MLM head (e.g. a local bert-base-uncased). fit() also records, for each rare word of the fitting corpus,
its most frequent contextual choice; that table answers context-free calls such as tokenizer.simplify(word).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

from toyjax import bert as bert_lib
from toyjax.tokenizers.words import UNK, word_class

SENTENCE_ENDS = {".", "!", "?"}


class ContextualSimplifier:
    """Rare word -> most probable top word in its sentence under a masked LM (see module docstring)."""

    name = "contextual"
    window = 24  # words kept on each side of the rare word, inside its sentence
    occurrences_per_word_at_fit = 3  # fit-time sample per rare word for the context-free table
    chunk = 256  # occurrences per most_probable call (one progress-bar step)

    def __init__(self, model_path: str | Path | None = None, word_fallback: dict[str, str] | None = None):
        self.model_path = model_path or os.environ.get("TOYJAX_BERT")
        self.word_fallback = dict(word_fallback or {})
        self.top_words: list[str] = []
        self._bert = None
        self._cache: dict[tuple, str] = {}

    # -- contract -----------------------------------------------------------------------------------------
    def fit(self, word_counts: collections.Counter, top_words: list[str], documents: list[list[str]]) -> None:
        self.top_words = list(top_words)
        self._bert_model()  # fail early if the model has no MLM head
        top = set(top_words)
        seen: collections.Counter = collections.Counter()
        sample = []
        for words in documents:
            for i, word in enumerate(words):
                if word not in top and seen[word] < self.occurrences_per_word_at_fit:
                    seen[word] += 1
                    sample.append((words, i))
        choices = collections.defaultdict(collections.Counter)
        for (words, i), chosen in zip(sample, self.simplify_occurrences(sample)):
            choices[words[i]][chosen] += 1
        self.word_fallback = {word: counts.most_common(1)[0][0] for word, counts in choices.items()}

    def simplify_occurrences(self, occurrences: list[tuple[list[str], int]]) -> list[str]:
        results: list[str | None] = [None] * len(occurrences)
        todo: dict[tuple, list[int]] = collections.defaultdict(list)  # context key -> occurrence indices
        for n, (words, index) in enumerate(occurrences):
            left, right = self._context(words, index)
            if not left and not right:  # no context: the fit-time table (or <unk>)
                results[n] = self.word_fallback.get(words[index], UNK)
                continue
            key = (tuple(left), word_class(words[index]), tuple(right))
            if key in self._cache:
                results[n] = self._cache[key]
            else:
                todo[key].append(n)
        keys = list(todo)
        by_class = collections.defaultdict(list)
        for key in keys:
            by_class[key[1]].append(key)
        for kind, class_keys in by_class.items():
            candidates = [w for w in self.top_words if word_class(w) == kind]
            if not candidates:
                for key in class_keys:
                    self._cache[key] = UNK
                continue
            texts = [" ".join([*left, bert_lib.MASK_TOKEN, *right]) for left, _, right in class_keys]
            chosen = []
            for start in self._progress(range(0, len(texts), self.chunk), len(texts)):
                chosen += bert_lib.most_probable(self._bert_model(), texts[start: start + self.chunk], candidates)
            self._cache.update(zip(class_keys, chosen))
        for key, indices in todo.items():
            for n in indices:
                results[n] = self._cache[key]
        return results

    def state(self) -> dict:
        return {"model_path": None if self.model_path is None else str(self.model_path),
                "top_words": self.top_words, "word_fallback": self.word_fallback}

    @classmethod
    def from_state(cls, state: dict) -> "ContextualSimplifier":
        simplifier = cls(state.get("model_path"), state.get("word_fallback"))
        simplifier.top_words = list(state.get("top_words", []))
        return simplifier

    # -- helpers ------------------------------------------------------------------------------------------
    @property
    def mapping(self) -> dict[str, str]:
        """The context-free table (rare word -> its most frequent contextual choice at fit time)."""
        return self.word_fallback

    def _bert_model(self):
        if self._bert is None:
            self._bert = bert_lib.load(self.model_path)
            if not self._bert.has_mlm_head:
                raise ValueError(
                    f"contextual simplification needs a masked LM with an MLM head; {self._bert.folder} has none. "
                    "Adapt one (python launch.py bert-adapt --config experiments/configs/bert_adapt.py "
                    "--workdir runs/bert_adapt) and set "
                    "TOYJAX_BERT=runs/bert_adapt/hf, or pass ContextualSimplifier(model_path=...)")
        return self._bert

    def _context(self, words: list[str], index: int) -> tuple[list[str], list[str]]:
        """Returns the words left and right of words[index] inside its sentence, at most `window` each."""
        start = index
        while start > 0 and index - start < self.window and words[start - 1] not in SENTENCE_ENDS:
            start -= 1
        end = index + 1
        while end < len(words) and end - index <= self.window:
            end += 1
            if words[end - 1] in SENTENCE_ENDS:
                break
        return list(words[start:index]), list(words[index + 1: end])

    @staticmethod
    def _progress(steps, total: int):
        if total <= ContextualSimplifier.chunk:
            return steps
        from tqdm import tqdm

        return tqdm(steps, desc=f"contextual simplification ({total} contexts)", unit="chunk")
