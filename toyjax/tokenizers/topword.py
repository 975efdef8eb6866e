"""Top-word tokenizer: the K most frequent words of a corpus; a rarer word is simplified to a top word.

Word-level pre-tokenisation and the vocabulary live in a Hugging Face `tokenizers` WordLevel model, saved as
tokenizer.json, so the vocabulary works outside toyjax. The rare-word simplification (which the WordLevel model
cannot express) is applied on top, and saved beside it in toyjax_tokenizer.json.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from toyjax.tokenizers import simplify as simplify_lib

SPECIALS = ("<pad>", "<unk>", "<eos>")
# Words (with inner apostrophes: "don't"), numbers, or any other single visible character.
WORD_PATTERN = r"\p{L}+(?:['’]\p{L}+)*|\p{N}+|\S"
META_FILE = "toyjax_tokenizer.json"
HF_FILE = "tokenizer.json"

_NO_SPACE_BEFORE = set(".,!?;:)]}%'’")
_NO_SPACE_AFTER = set("([{$")
_SENTENCE_END = set(".!?")


def detokenize(words: list[str], capitalize: bool, surface_forms: dict[str, str] | None = None) -> str:
    """Returns readable text: no space before punctuation, paired double quotes, optional sentence capitals.

    surface_forms: a word's spelling in running text where it is not the token itself ("lily" -> "Lily").
    """
    surface_forms = surface_forms or {}
    out: list[str] = []
    quote_open = False
    glue_next = True  # no space before the first word
    new_sentence = True
    for word in words:
        if word in SPECIALS:
            if word == "<eos>":
                out.append("\n")
                glue_next, new_sentence, quote_open = True, True, False
                continue
        text = surface_forms.get(word, word)
        if capitalize and new_sentence and text[:1].isalpha():
            text = text[0].upper() + text[1:]
        if capitalize and text == "i":
            text = "I"
        if word == '"':
            space = not quote_open and not glue_next
            glue_after = not quote_open
            quote_open = not quote_open
        else:
            space = not glue_next and word not in _NO_SPACE_BEFORE
            glue_after = word in _NO_SPACE_AFTER
        out.append((" " if space else "") + text)
        glue_next = glue_after
        if word in _SENTENCE_END or (word == '"' and quote_open):  # quoted speech opens a sentence
            new_sentence = True
        elif word != '"':
            new_sentence = False
    return "".join(out).strip(" ")


class TopWordTokenizer:
    """Vocabulary = specials + the K most frequent words; rare words simplified by a named strategy."""

    kind = "topword"

    def __init__(self, hf: Tokenizer, strategy, *, lowercase: bool, stats: dict | None = None,
                 surface_forms: dict[str, str] | None = None):
        self.hf = hf
        self.strategy = strategy
        self.lowercase = lowercase
        self.stats = stats or {}
        # Lowercased words whose usual mid-sentence spelling differs (names: "lily" -> "Lily"); used by decode.
        self.surface_forms = surface_forms or {}
        self.token_to_id: dict[str, int] = hf.get_vocab()
        self.vocab: list[str] = [None] * len(self.token_to_id)
        for token, index in self.token_to_id.items():
            self.vocab[index] = token
        self.pad_id, self.unk_id, self.eos_id = (self.token_to_id[s] for s in SPECIALS)

    # -- building -------------------------------------------------------------------------------------------

    @staticmethod
    def _hf_tokenizer(vocab: dict[str, int], lowercase: bool) -> Tokenizer:
        hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        hf.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")]
        )
        return hf

    @classmethod
    def fit(cls, texts: Iterable[str], vocab_size: int = 1024, *, lowercase: bool = True,
            simplify: str = "nearest", simplify_options: dict | None = None) -> "TopWordTokenizer":
        """Counts words in `texts` and keeps the vocab_size - 3 most frequent (ties broken alphabetically).

        simplify_options: keyword arguments for the strategy (e.g. {"model_path": ...} for "contextual").
        """
        if vocab_size <= len(SPECIALS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIALS)} special tokens, got {vocab_size}")
        texts = list(texts)
        splitter = cls._hf_tokenizer({s: i for i, s in enumerate(SPECIALS)}, lowercase)
        documents = [cls._split(splitter, text) for text in texts]
        counts = collections.Counter(w for words in documents for w in words)
        if not counts:
            raise ValueError("cannot fit a tokenizer on an empty corpus (no words found)")
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        top_words = [w for w, _ in ranked if w not in SPECIALS][: vocab_size - len(SPECIALS)]
        vocab = {token: i for i, token in enumerate(list(SPECIALS) + top_words)}
        strategy = simplify_lib.get_strategy(simplify)(**(simplify_options or {}))
        strategy.fit(counts, top_words, documents)
        surface_forms = cls._surface_forms(texts, top_words) if lowercase else {}
        tokenizer = cls(cls._hf_tokenizer(vocab, lowercase), strategy, lowercase=lowercase, surface_forms=surface_forms)
        tokenizer.stats = tokenizer._corpus_stats(counts)
        return tokenizer

    @classmethod
    def _surface_forms(cls, texts: list[str], words: list[str]) -> dict[str, str]:
        """Returns {word: its most frequent mid-sentence spelling} for the words whose spelling is not all lowercase.

        Sentence-initial occurrences (after . ! ? or a quote, or first in a text) are not counted: their capital
        says nothing about the word, and decode capitalises sentence starts anyway. Ties go to the lowercase form.
        """
        splitter = cls._hf_tokenizer({s: i for i, s in enumerate(SPECIALS)}, lowercase=False)
        wanted = set(words)
        spellings: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for text in texts:
            previous = None
            for piece in cls._split(splitter, text):
                word = piece.lower()
                if word in wanted and previous is not None and previous not in _SENTENCE_END and previous != '"':
                    spellings[word][piece] += 1
                previous = piece
        forms = {word: max(counts, key=lambda form: (counts[form], form == word, form))
                 for word, counts in spellings.items()}
        return {word: form for word, form in sorted(forms.items()) if form != word}

    def _corpus_stats(self, counts: collections.Counter) -> dict:
        total = sum(counts.values())
        in_vocab = sum(n for w, n in counts.items() if w in self.token_to_id)
        # A contextual strategy's mapping holds each rare word's most frequent choice over its occurrences.
        mapping = getattr(self.strategy, "mapping", None) or {}
        simplified = sum(n for w, n in counts.items() if w not in self.token_to_id and mapping.get(w, "<unk>") != "<unk>")
        return {
            "corpus_words": total,
            "distinct_words": len(counts),
            "coverage": in_vocab / total,
            "simplified_share": simplified / total,
            "unknown_share": (total - in_vocab - simplified) / total,
        }

    @staticmethod
    def _split(hf: Tokenizer, text: str) -> list[str]:
        normalized = hf.normalizer.normalize_str(text)
        return [piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(normalized)]

    # -- encoding -------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def pre_tokenize(self, text: str) -> list[str]:
        """Returns the raw words and punctuation of `text` (lowercased if the tokenizer lowercases)."""
        return self._split(self.hf, text)

    def words_batch(self, texts: list[str]) -> list[list[str]]:
        """Returns each text as vocabulary tokens, rare words simplified (batched for contextual strategies)."""
        split = [self.pre_tokenize(t) for t in texts]
        occurrences, where = [], []
        for doc, words in enumerate(split):
            for i, w in enumerate(words):
                if w not in self.token_to_id:
                    occurrences.append((words, i))
                    where.append((doc, i))
        if occurrences:
            chosen = self.strategy.simplify_occurrences(occurrences)
            split = [list(words) for words in split]
            for (doc, i), word in zip(where, chosen):
                split[doc][i] = word if word in self.token_to_id else "<unk>"
        return split

    def words(self, text: str) -> list[str]:
        return self.words_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[self.token_to_id[w] for w in words] for words in self.words_batch(list(texts))]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_with_spans(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Returns, per text, its token ids and each token's [start, end) span over pre_tokenize(text).

        A top-word token always stands for exactly one word (a rare word is replaced, never split or merged).
        """
        return [(ids, [(i, i + 1) for i in range(len(ids))]) for ids in self.encode_batch(list(texts))]

    def simplify(self, word: str) -> str:
        """Returns the vocabulary word that `word` becomes (itself if it is a top word)."""
        pieces = self.pre_tokenize(word)
        if len(pieces) != 1:
            raise ValueError(f"simplify() takes one word; {word!r} splits into {pieces}")
        if pieces[0] in self.token_to_id:
            return pieces[0]
        return self.strategy.simplify_occurrences([(pieces, 0)])[0]

    def detokenize(self, words: list[str]) -> str:
        return detokenize(words, capitalize=self.lowercase, surface_forms=self.surface_forms)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return self.detokenize([self.vocab[i] for i in ids if i != self.pad_id])

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path / HF_FILE))
        meta = {"kind": self.kind, "lowercase": self.lowercase, "strategy": self.strategy.name,
                "strategy_state": self.strategy.state(), "stats": self.stats, "surface_forms": self.surface_forms}
        (path / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "TopWordTokenizer":
        path = Path(path)
        for name in (HF_FILE, META_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} is not a saved toyjax tokenizer: {name} is missing")
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("kind") != cls.kind:
            raise ValueError(f"{path} holds a '{meta.get('kind')}' tokenizer, not '{cls.kind}'")
        strategy = simplify_lib.get_strategy(meta["strategy"]).from_state(meta["strategy_state"])
        return cls(Tokenizer.from_file(str(path / HF_FILE)), strategy,
                   lowercase=meta["lowercase"], stats=meta.get("stats"), surface_forms=meta.get("surface_forms"))

    def __repr__(self) -> str:
        return f"TopWordTokenizer(vocab_size={self.vocab_size}, strategy={self.strategy.name!r}, lowercase={self.lowercase})"

