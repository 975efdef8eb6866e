"""From a data config to token streams and batches; the batch for step s depends only on (seed, s)."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from toyjax.config import DataConfig, TokenizerConfig
from toyjax.config_rules import GRAMMAR_SOURCES
from toyjax.data import stories, text


def load_documents(cfg: DataConfig) -> list[str]:
    """Returns the corpus named by data.source as a list of documents."""
    source = cfg.source
    if source == "stories":
        docs = stories.generate_texts(cfg.n_stories, cfg.generator_seed)
    elif source in GRAMMAR_SOURCES:
        from toyjax.data import structured

        n_structured = cfg.n_stories if source == "structured" else int(round(cfg.n_stories * cfg.structured_share))
        docs = structured.generate_documents(n_structured, cfg.generator_seed)
        if source == "mixed":
            docs += stories.generate_texts(cfg.n_stories - n_structured, cfg.generator_seed)
            order = np.random.default_rng(cfg.generator_seed).permutation(len(docs))
            docs = [docs[i] for i in order]
    elif source.startswith("hf:"):
        docs = text.read_hf_dataset(source[3:], limit=cfg.max_documents)
    else:
        docs = text.read_corpus(source)
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise text.CorpusError(f"data.source {source!r} gave no documents")
    return docs


def split_train_valid(docs: list[str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Splits by a hash of each document's text: stable under reordering and across machines."""
    valid = [d for d in docs if zlib.crc32(d.encode()) % 10_000 < valid_fraction * 10_000]
    train = [d for d in docs if zlib.crc32(d.encode()) % 10_000 >= valid_fraction * 10_000]
    if not train or (valid_fraction > 0 and not valid):
        raise text.CorpusError(f"corpus of {len(docs)} documents is too small to split with valid_fraction={valid_fraction}")
    return train, valid


def fit_tokenizer(cfg: TokenizerConfig, texts: list[str]):
    """Fits the tokenizer named by tokenizer.kind on the training texts."""
    from toyjax.tokenizers import TopWordTokenizer

    options = {"model_path": cfg.bert_model} if cfg.simplify == "contextual" and cfg.bert_model else None
    base = TopWordTokenizer.fit(texts, vocab_size=cfg.vocab_size, lowercase=cfg.lowercase, simplify=cfg.simplify,
                                simplify_options=options)
    if cfg.kind == "topword":
        return base
    if cfg.kind == "phrase":
        from toyjax.tokenizers import PhraseTokenizer

        return PhraseTokenizer.fit(texts, base=base, n_phrases=cfg.phrase_vocab_size)
    raise ValueError(f"unknown tokenizer.kind {cfg.kind!r}; choose 'topword' or 'phrase'")


@dataclasses.dataclass
class TokenStream:
    """Documents encoded and joined, each followed by <eos>; side arrays (e.g. grammar state) aligned to it."""

    tokens: np.ndarray  # [n] int32
    n_words: int  # words before tokenization (for bits-per-word)
    side: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def encode(cls, tokenizer, docs: list[str]) -> "TokenStream":
        ids = tokenizer.encode_batch(docs)
        tokens = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_id)), np.int32)
        base = getattr(tokenizer, "base", tokenizer)
        n_words = sum(len(base.pre_tokenize(d)) for d in docs)
        return cls(tokens, n_words)

    def window_count(self, length: int) -> int:
        return len(self.tokens) - length - 1

    def _gather(self, starts: np.ndarray, length: int) -> dict[str, np.ndarray]:
        index = starts[:, None] + np.arange(length + 1)[None, :]
        window = self.tokens[index]
        batch = {"inputs": window[:, :-1], "targets": window[:, 1:]}
        for name, values in self.side.items():
            batch[name] = values[index[:, :-1]]
        return batch

    def batch(self, step: int, *, seed: int, batch_size: int, length: int,
              rows: slice | None = None) -> dict[str, np.ndarray]:
        """Returns the training batch for `step`: random windows drawn from a generator seeded by (seed, step).

        rows: only these rows of that batch (a process's share on a multi-process mesh); the same windows either way.
        """
        if self.window_count(length) <= 0:
            raise ValueError(f"the training stream has {len(self.tokens)} tokens, fewer than one window of {length + 1}")
        starts = np.random.default_rng([seed, step]).integers(0, self.window_count(length) + 1, batch_size)
        return self._gather(starts if rows is None else starts[rows], length)

    def eval_batches(self, n_batches: int, *, batch_size: int, length: int) -> list[dict[str, np.ndarray]]:
        """Returns fixed, evenly spaced windows covering the stream (the same every evaluation)."""
        count = min(n_batches * batch_size, max(self.window_count(length) // length, 1))
        if self.window_count(length) < 0:
            raise ValueError(f"the validation stream has {len(self.tokens)} tokens, fewer than one window of {length + 1}")
        starts = np.linspace(0, max(self.window_count(length), 0), count).astype(np.int64)
        return [self._gather(starts[i:i + batch_size], length) for i in range(0, count, batch_size)]
