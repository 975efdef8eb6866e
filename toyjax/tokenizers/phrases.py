"""Phrase tokenizer: frequent, cohesive runs of top words merged into single readable tokens.

Learned on top of a top-word tokenizer (`base`), like byte-pair encoding but at the word level:

* The base tokenization (`base.encode`, rare words already simplified) is cut into *runs* of word tokens.
  Punctuation and the specials (<pad>, <unk>, <eos>) end a run and never join a phrase, so a phrase never
  crosses a sentence end, a comma or a document end, and every phrase reads as plain words: "once_upon_a_time".
* Each step merges the adjacent pair (a, b) with the highest score

      score(a, b) = count(a, b) * npmi(a, b),
      npmi(a, b)  = ln(p(a, b) / (p(a) p(b))) / -ln p(a, b),   p(x) = count(x) / N,  p(a, b) = count(a, b) / N,

  counted over the current tokens of the runs (N = number of tokens in runs; pairs counted overlapping, as
  in BPE). Normalised PMI (Bouma 2009, as in collocation detection) is 1 for words that only occur together
  and about 0 for independent ones, so frequency alone cannot merge "in the" ahead of "once upon". Only pairs
  with count >= min_count, npmi >= min_npmi and at most max_words words in the result are eligible; exact
  score ties go to the alphabetically first pair. Learning stops at the target size or when nothing is
  eligible.
* A merge rewrites every occurrence of (a, b), left to right. Encoding applies the merges the same way, in
  learned order (BPE's "lowest-ranked pair present first", which equals applying them one after another), so
  the segmentation of a training text at encode time is exactly the one the learner counted.

Phrase ids come after the base ids (ids 0..base.vocab_size-1 are the base tokens, specials included), so a
phrase expands to base ids by a table lookup and `decode(ids) == base.decode(to_base_ids(ids))`.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from toyjax.tokenizers.topword import META_FILE

JOINER = "_"
BASE_FOLDER = "base"
_SENTENCE_END = {".", "!", "?"}


# -- pure functions over id sequences --------------------------------------------------------------------------


def npmi(pair_count, left_count, right_count, total):
    """Returns normalised pointwise mutual information in [-1, 1] (numpy or float inputs, float64)."""
    pair_count = np.asarray(pair_count, np.float64)
    p_pair = pair_count / total
    pmi = np.log(pair_count * total / (np.asarray(left_count, np.float64) * np.asarray(right_count, np.float64)))
    with np.errstate(divide="ignore", invalid="ignore"):
        # p(a, b) = 1 only when the corpus is the single pair: perfectly cohesive.
        return np.where(p_pair < 1.0, pmi / -np.log(np.minimum(p_pair, 1.0)), 1.0)


def split_runs(ids: Sequence[int], mergeable: np.ndarray) -> list[tuple[bool, list[int]]]:
    """Returns the sequence cut into (is_run_of_words, ids) pieces; a non-word token is its own piece."""
    pieces: list[tuple[bool, list[int]]] = []
    run: list[int] = []
    for token in ids:
        if mergeable[token]:
            run.append(token)
        else:
            if run:
                pieces.append((True, run))
                run = []
            pieces.append((False, [token]))
    if run:
        pieces.append((True, run))
    return pieces


def merge_pair(run: list[int], left: int, right: int, new: int) -> list[int]:
    """Returns `run` with every (left, right) occurrence, scanned left to right, replaced by `new`."""
    out, i = [], 0
    while i < len(run):
        if i + 1 < len(run) and run[i] == left and run[i + 1] == right:
            out.append(new)
            i += 2
        else:
            out.append(run[i])
            i += 1
    return out


def apply_merges(run: list[int], ranks: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """Returns a run of word ids segmented by the learned merges (ranks: pair -> (rank, new id))."""
    while len(run) > 1:
        best = None
        for pair in zip(run, run[1:]):
            found = ranks.get(pair)
            if found is not None and (best is None or found[0] < best[1][0]):
                best = (pair, found)
        if best is None:
            break
        (left, right), (_, new) = best
        run = merge_pair(run, left, right, new)
    return run


def learn_merges(runs: Iterable[Sequence[int]], base_vocab_size: int, n_merges: int, *, min_count: int = 5,
                 min_npmi: float = 0.2, max_words: int = 4, names: Sequence[str] | None = None):
    """Returns (merges, records, final_runs): the learned (left, right) pairs in order, one dict of
    count/npmi/score per merge, and the distinct runs after all merges (as a Counter run -> frequency).

    The merge k creates id base_vocab_size + k. `names` (id -> string, grown here) only breaks exact ties.
    """
    runs_counter = collections.Counter(tuple(r) for r in runs if len(r) > 0)
    seqs = [list(r) for r in runs_counter]
    freqs = list(runs_counter.values())
    size = base_vocab_size + n_merges
    unigram = np.zeros(size, np.int64)
    n_words = np.ones(size, np.int64)  # base words each token stands for
    names = list(names) if names is not None else [str(i) for i in range(base_vocab_size)]
    pair_count: collections.Counter = collections.Counter()
    where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for index, (seq, freq) in enumerate(zip(seqs, freqs)):
        for token in seq:
            unigram[token] += freq
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += freq
            where[pair].add(index)
    total = int(unigram.sum())

    # Pair counts mirrored into growable arrays so each step scores every pair in one vectorised pass.
    slot_of: dict[tuple[int, int], int] = {}
    lefts, rights, counts = (np.zeros(max(16, 2 * len(pair_count)), np.int64) for _ in range(3))

    def put(pair, count):
        nonlocal lefts, rights, counts
        slot = slot_of.get(pair)
        if slot is None:
            slot = slot_of[pair] = len(slot_of)
            if slot >= len(lefts):
                lefts, rights, counts = (np.concatenate([a, np.zeros_like(a)]) for a in (lefts, rights, counts))
            lefts[slot], rights[slot] = pair
        counts[slot] = count

    for pair, count in pair_count.items():
        put(pair, count)

    merges, records = [], []
    for step in range(n_merges):
        used = len(slot_of)
        left, right, count = lefts[:used], rights[:used], counts[:used]
        eligible = (count >= min_count) & (n_words[left] + n_words[right] <= max_words)
        if not eligible.any():
            break
        candidates = np.flatnonzero(eligible)
        cohesion = npmi(count[candidates], unigram[left[candidates]], unigram[right[candidates]], total)
        keep = cohesion >= min_npmi
        if not keep.any():
            break
        candidates, cohesion = candidates[keep], cohesion[keep]
        score = count[candidates] * cohesion
        ties = np.flatnonzero(score == score.max())
        pick = min(ties, key=lambda t: (names[left[candidates[t]]], names[right[candidates[t]]]))
        best = candidates[pick]
        a, b = int(left[best]), int(right[best])
        new = base_vocab_size + step
        records.append({"count": int(count[best]), "npmi": float(cohesion[pick]), "score": float(score[pick])})
        merges.append((a, b))
        names.append(names[a] + JOINER + names[b])
        n_words[new] = n_words[a] + n_words[b]

        changed: dict[tuple[int, int], int] = {}
        for index in list(where.pop((a, b), ())):
            seq, freq = seqs[index], freqs[index]
            merged = merge_pair(seq, a, b, new)
            if len(merged) == len(seq):
                continue  # stale entry: an earlier merge already consumed this pair here
            made = (len(seq) - len(merged)) * freq
            unigram[a] -= made
            unigram[b] -= made
            unigram[new] += made
            total -= made
            for pair in zip(seq, seq[1:]):
                pair_count[pair] -= freq
                changed[pair] = pair_count[pair]
            for pair in zip(merged, merged[1:]):
                pair_count[pair] += freq
                changed[pair] = pair_count[pair]
                where[pair].add(index)
            seqs[index] = merged
        for pair, value in changed.items():
            put(pair, value)
    final_runs = collections.Counter()
    for seq, freq in zip(seqs, freqs):
        final_runs[tuple(seq)] += freq
    return merges, records, final_runs


def bits_per_word(total_nll_nats: float, n_words: int) -> float:
    """Returns bits per word: a summed negative log-likelihood (nats) over a span, per word of that span."""
    if n_words <= 0:
        raise ValueError(f"bits_per_word needs a positive word count, got n_words={n_words}")
    return float(total_nll_nats) / (n_words * math.log(2.0))


def count_words(tokenizer, ids: Iterable[int]) -> int:
    """Returns how many words (top-word tokens, punctuation included, specials excluded) `ids` stand for.

    Works for a top-word or a phrase tokenizer; it matches the pipeline's word count (base.pre_tokenize pieces),
    so bits per word of the two tokenizations divide the same kind of count.
    """
    base_ids = tokenizer.to_base_ids(ids) if hasattr(tokenizer, "to_base_ids") else [int(i) for i in ids]
    specials = {tokenizer.pad_id, tokenizer.eos_id}  # <unk> stands for a (rare) word, so it counts
    return sum(1 for i in base_ids if i not in specials)


# -- the tokenizer ---------------------------------------------------------------------------------------------


def _is_word(token: str) -> bool:
    return any(ch.isalnum() for ch in token)


class PhraseTokenizer:
    """Base top-word tokens plus learned phrase tokens; ids below base.vocab_size are the base tokens."""

    kind = "phrase"

    def __init__(self, base, merges: Sequence[tuple[int, int]], *, settings: dict | None = None,
                 merge_records: list | None = None, fit_stats: dict | None = None):
        self.base = base
        self.settings = dict(settings or {})
        self.merge_records = list(merge_records or [])
        self.fit_stats = dict(fit_stats or {})
        self.base_vocab_size = base.vocab_size
        specials = {base.pad_id, base.unk_id, base.eos_id}
        self.mergeable = np.array([i not in specials and _is_word(t) for i, t in enumerate(base.vocab)], bool)
        self.expansions: list[tuple[int, ...]] = [(i,) for i in range(base.vocab_size)]
        self.vocab: list[str] = list(base.vocab)
        self.token_to_id: dict[str, int] = dict(base.token_to_id)
        self.merges: list[tuple[int, int]] = []
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for a, b in merges:
            a, b = int(a), int(b)
            new = len(self.vocab)
            if not (0 <= a < new and 0 <= b < new) or not all(self.mergeable[list(self.expansions[a] + self.expansions[b])]):
                raise ValueError(f"merge {len(self.merges)} ({a}, {b}) does not join two word tokens already in the "
                                 f"vocabulary; the saved merges do not fit this base tokenizer")
            name = self.vocab[a] + JOINER + self.vocab[b]
            while name in self.token_to_id:  # only if a base word itself contains the joiner
                name += JOINER
            self.merges.append((a, b))
            self._ranks[(a, b)] = (len(self._ranks), new)
            self.expansions.append(self.expansions[a] + self.expansions[b])
            self.vocab.append(name)
            self.token_to_id[name] = new
        self.pad_id, self.unk_id, self.eos_id = base.pad_id, base.unk_id, base.eos_id
        self._cache: dict[tuple[int, ...], tuple[int, ...]] = {}

    # -- building -------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, texts: Iterable[str], base, vocab_size: int | None = None, *, n_phrases: int | None = None,
            min_count: int = 5, min_npmi: float = 0.2, max_words: int = 4) -> "PhraseTokenizer":
        """Learns up to vocab_size - base.vocab_size phrases (or n_phrases) on `texts` tokenized by `base`.

        vocab_size is the total size (base tokens + phrases); give exactly one of vocab_size, n_phrases.
        """
        if (vocab_size is None) == (n_phrases is None):
            raise ValueError("PhraseTokenizer.fit: give exactly one of vocab_size (total, base tokens + phrases) "
                             "or n_phrases (phrases added on top of the base)")
        if n_phrases is None:
            if vocab_size <= base.vocab_size:
                raise ValueError(f"PhraseTokenizer.fit: vocab_size={vocab_size} is the total vocabulary and must "
                                 f"exceed the base vocabulary ({base.vocab_size}); to add {vocab_size} phrases "
                                 f"pass n_phrases={vocab_size} (or vocab_size={base.vocab_size + vocab_size})")
            n_phrases = vocab_size - base.vocab_size
        if n_phrases < 0 or min_count < 1 or max_words < 2:
            raise ValueError(f"PhraseTokenizer.fit: need n_phrases >= 0, min_count >= 1, max_words >= 2; got "
                             f"{n_phrases}, {min_count}, {max_words}")
        probe = cls(base, [])
        runs = [piece for ids in base.encode_batch(list(texts))
                for is_run, piece in split_runs(ids, probe.mergeable) if is_run]
        if not runs:
            raise ValueError("PhraseTokenizer.fit: the texts hold no words to learn phrases from")
        merges, records, _ = learn_merges(runs, base.vocab_size, n_phrases, min_count=min_count,
                                          min_npmi=min_npmi, max_words=max_words, names=base.vocab)
        settings = {"min_count": min_count, "min_npmi": min_npmi, "max_words": max_words,
                    "requested_phrases": n_phrases}
        fit_stats = {"runs": len(runs), "run_words": sum(len(r) for r in runs), "learned_phrases": len(merges)}
        return cls(base, merges, settings=settings, merge_records=records, fit_stats=fit_stats)

    # -- encoding -------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def lowercase(self) -> bool:
        return self.base.lowercase

    def phrase_ids_from_base(self, base_ids: Sequence[int]) -> list[int]:
        """Returns base token ids segmented into phrase ids (the inverse of to_base_ids)."""
        out: list[int] = []
        for is_run, piece in split_runs(base_ids, self.mergeable):
            if not is_run or len(piece) == 1:
                out.extend(piece)
                continue
            key = tuple(piece)
            merged = self._cache.get(key)
            if merged is None:
                merged = self._cache[key] = tuple(apply_merges(piece, self._ranks))
            out.extend(merged)
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.phrase_ids_from_base(ids) for ids in self.base.encode_batch(list(texts))]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_with_spans(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Returns, per text, its token ids and each token's [start, end) span over pre_tokenize(text)."""
        out = []
        for base_ids in self.base.encode_batch(list(texts)):
            ids = self.phrase_ids_from_base(base_ids)
            ends = np.cumsum([len(self.expansions[i]) for i in ids], dtype=np.int64)
            out.append((ids, [(int(end) - len(self.expansions[i]), int(end)) for i, end in zip(ids, ends)]))
        return out

    def to_base_ids(self, ids: Iterable[int]) -> list[int]:
        """Returns the base (top-word) ids that the phrase ids stand for."""
        out: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the phrase vocabulary (size {self.vocab_size})")
            out.extend(self.expansions[i])
        return out

    def token_words(self, token_id: int) -> list[str]:
        """Returns the base words a token stands for."""
        return [self.base.vocab[i] for i in self.to_base_ids([token_id])]

    def tokens(self, text: str) -> list[str]:
        """Returns the readable tokens of `text` ("once_upon_a_time", ",", "lily", ...)."""
        return [self.vocab[i] for i in self.encode(text)]

    def decode(self, ids) -> str:
        return self.base.decode(self.to_base_ids(ids))

    # The word-level view is the base tokenizer's: it is what bits per word are normalised by.
    def pre_tokenize(self, text: str) -> list[str]:
        return self.base.pre_tokenize(text)

    def words(self, text: str) -> list[str]:
        return self.base.words(text)

    def words_batch(self, texts: list[str]) -> list[list[str]]:
        return self.base.words_batch(texts)

    def detokenize(self, words: list[str]) -> str:
        return self.base.detokenize(words)

    def simplify(self, word: str) -> str:
        return self.base.simplify(word)

    # -- statistics -----------------------------------------------------------------------------------------

    def stats(self, texts: Sequence[str], top: int = 20) -> dict:
        """Returns tokens vs words per sentence, mean words per token, top phrases and phrase coverage."""
        n_words = n_tokens = n_sentences = words_in_phrases = 0
        phrase_counts: collections.Counter = collections.Counter()
        end_ids = {self.base.token_to_id[p] for p in _SENTENCE_END if p in self.base.token_to_id} | {self.eos_id}
        for base_ids in self.base.encode_batch(list(texts)):
            ids = self.phrase_ids_from_base(base_ids)
            n_words += len(base_ids)
            n_tokens += len(ids)
            ends = sum(1 for i in base_ids if i in end_ids)
            n_sentences += ends + (1 if base_ids and base_ids[-1] not in end_ids else 0)
            for i in ids:
                if i >= self.base_vocab_size:
                    phrase_counts[i] += 1
                    words_in_phrases += len(self.expansions[i])
        if n_tokens == 0:
            raise ValueError("PhraseTokenizer.stats: the texts hold no tokens")
        n_phrases = self.vocab_size - self.base_vocab_size
        return {
            "words": n_words,  # base (top-word) tokens, punctuation included
            "tokens": n_tokens,
            "sentences": n_sentences,
            "words_per_sentence": n_words / max(n_sentences, 1),
            "tokens_per_sentence": n_tokens / max(n_sentences, 1),
            "mean_words_per_token": n_words / n_tokens,
            "phrase_token_share": sum(phrase_counts.values()) / n_tokens,
            "words_in_phrases_share": words_in_phrases / max(n_words, 1),  # coverage of the text by phrases
            "phrases_used_share": len(phrase_counts) / max(n_phrases, 1),  # coverage of the phrase vocabulary
            "top_phrases": [(self.vocab[i], n) for i, n in phrase_counts.most_common(top)],
        }

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.base.save(path / BASE_FOLDER)
        meta = {"kind": self.kind, "base": BASE_FOLDER, "base_vocab_size": self.base_vocab_size,
                "merges": [f"{a} {b}" for a, b in self.merges], "phrases": self.vocab[self.base_vocab_size:],
                "settings": self.settings, "merge_records": self.merge_records, "fit_stats": self.fit_stats}
        (path / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "PhraseTokenizer":
        from toyjax.tokenizers import load_tokenizer  # late: the package imports this module

        path = Path(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a saved toyjax tokenizer: {META_FILE} is missing")
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("kind") != cls.kind:
            raise ValueError(f"{path} holds a '{meta.get('kind')}' tokenizer, not '{cls.kind}'")
        base = load_tokenizer(path / meta.get("base", BASE_FOLDER))
        if base.vocab_size != meta["base_vocab_size"]:
            raise ValueError(f"{path}: the base tokenizer has {base.vocab_size} tokens but the phrases were learned "
                             f"on {meta['base_vocab_size']}; the folder is inconsistent")
        merges = [tuple(int(i) for i in (m.split() if isinstance(m, str) else m)) for m in meta["merges"]]
        tokenizer = cls(base, merges, settings=meta.get("settings"),
                        merge_records=meta.get("merge_records"), fit_stats=meta.get("fit_stats"))
        if tokenizer.vocab[tokenizer.base_vocab_size:] != meta["phrases"]:
            raise ValueError(f"{path}: the merges rebuild different phrases than the ones recorded; "
                             f"the base tokenizer was changed after the phrases were learned")
        return tokenizer

    def __repr__(self) -> str:
        return (f"PhraseTokenizer(vocab_size={self.vocab_size}, phrases={len(self.merges)}, "
                f"base={self.base!r})")
