"""One evaluation core: per-token log-probs of any trained run on any text, and bits per *original* word.

Every tokenizer is charged on the same words, the pieces of `tokenizer.pre_tokenize(text)` (words and
punctuation, as `count_words` and the data pipeline count them), so runs with different vocabularies compare
on one footing:

* a top-word token stands for one word and its surprisal is that word's;
* a simplified word ("puppy" -> "dog") or an unknown word (<unk>) is charged the surprisal of the token that
  replaced it: the model paid for the word, just in a coarser currency (its status says which happened);
* a phrase token ("once_upon_a_time") spreads its surprisal evenly over the words it stands for.

Document boundaries follow training: a training stream is documents each followed by <eos>, so a text is
scored as `<eos> text <eos>`; the first word is predicted from the <eos> alone and the closing <eos> is
reported apart (`eos_bits`), not charged to any word.

Long texts use the standard strided sliding window (as in Hugging Face's "Perplexity of fixed-length models"):
windows of model.max_len inputs start every `stride` tokens (default max_len // 2); each window scores only
the targets the previous window did not, so every token is scored exactly once and, after the first window,
with at least max_len - stride tokens of context. A text that fits in max_len is one window, exactly as in
training.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from toyjax.data.run_data import run_grammar
from toyjax.runs import Run
from toyjax.train import cross_entropy, model_inputs

LN2 = math.log(2.0)


@dataclasses.dataclass
class ScoredText:
    """One text scored by one run: surprisal per token and per original word."""

    words: list[str]  # the original words (pre_tokenize pieces)
    word_bits: np.ndarray  # [n_words] float64 bits charged to each word
    word_status: list[str]  # per word: "word" (in the vocabulary), "simplified" or "unk"
    tokens: list[str]  # the tokens the run saw
    token_spans: list[tuple[int, int]]  # each token's [start, end) over words
    token_bits: np.ndarray  # [n_tokens] float64
    eos_bits: float  # surprisal of the closing <eos>

    @property
    def bits(self) -> float:
        return float(self.word_bits.sum())

    @property
    def bits_per_word(self) -> float:
        return self.bits / max(len(self.words), 1)


# -- pure accounting ------------------------------------------------------------------------------------------


def charge_words(token_cost: np.ndarray, spans: Sequence[tuple[int, int]], n_words: int) -> np.ndarray:
    """Returns per-word cost [n_words]: each token's cost spread evenly over the words of its span."""
    out = np.zeros(n_words, np.float64)
    for cost, (start, end) in zip(np.asarray(token_cost, np.float64), spans):
        if not 0 <= start < end <= n_words:
            raise ValueError(f"token span ({start}, {end}) does not lie inside the text's {n_words} words")
        out[start:end] += cost / (end - start)
    return out


def word_status(original: str, vocab_word: str) -> str:
    """Returns how a tokenizer kept an original word: "word", "unk" or "simplified"."""
    if original == vocab_word:
        return "word"
    return "unk" if vocab_word == "<unk>" else "simplified"


def window_plan(n_inputs: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Returns (begin, end, first_scored) input windows: strided sliding windows scoring each target once."""
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    plan, scored_until = [], 0
    for begin in range(0, max(n_inputs, 1), stride):
        end = min(begin + max_len, n_inputs)
        plan.append((begin, end, scored_until))
        scored_until = end
        if end == n_inputs:
            break
    return plan


# -- the model side -------------------------------------------------------------------------------------------


_LOG_PROB_FNS: dict = {}  # id(model) -> (model, restrict, fn): one compilation per model, not per call


def make_log_prob_fn(run: Run, grammar=None):
    """Returns jitted log_probs(params, inputs, targets, grammar_state) -> [batch, length] target log-probs.

    Without grammar tables the function is cached per model, so repeated calls (a fuzzer's) compile once.
    """
    restrict = run.config.train.loss == "valid_subset"
    cached = _LOG_PROB_FNS.get(id(run.model)) if grammar is None else None
    if cached is not None and cached[0] is run.model and cached[1] == restrict:
        return cached[2]

    def log_probs(params, inputs, targets, grammar_state):
        batch = {"inputs": inputs} if grammar_state is None else {"inputs": inputs, "grammar_state": grammar_state}
        valid_mask, features = model_inputs(batch, grammar)
        logits = run.model.apply({"params": params}, inputs, state_features=features, deterministic=True)
        return -cross_entropy(logits, targets, valid_mask if restrict else None)

    fn = jax.jit(log_probs)
    if grammar is None:
        _LOG_PROB_FNS[id(run.model)] = (run.model, restrict, fn)
    return fn


def _grammar_states(grammar, sequence: np.ndarray) -> np.ndarray:
    from toyjax.grammar import annotate

    # As in `launch.py sample`: the opening <eos> starts a document, the states after it come from the rest.
    return np.concatenate([[grammar.start], annotate(grammar, sequence[1:])]).astype(np.int32)


def token_log_probs(run: Run, sequences: Sequence[Sequence[int]], *, batch_size: int = 32,
                    stride: int | None = None) -> list[np.ndarray]:
    """Returns, per id sequence, the log-prob (nats, float64) of each token after the first ([len - 1])."""
    length = run.config.model.max_len
    stride = stride or max(length // 2, 1)
    grammar = run_grammar(run.config, run.tokenizer)
    pad = run.tokenizer.pad_id
    rows, states_rows, where = [], [], []  # where: (sequence, begin, first_scored, end)
    for index, seq in enumerate(sequences):
        seq = np.asarray(seq, np.int32)
        if len(seq) < 2:
            raise ValueError("a sequence to score needs at least two tokens (a context token and a target)")
        states = _grammar_states(grammar, seq) if grammar is not None else None
        for begin, end, first in window_plan(len(seq) - 1, length, stride):
            row = np.full(length + 1, pad, np.int32)
            row[: end - begin + 1] = seq[begin:end + 1]
            rows.append(row)
            if states is not None:
                state_row = np.full(length, grammar.start, np.int32)
                state_row[: end - begin] = states[begin:end]
                states_rows.append(state_row)
            where.append((index, begin, first, end))
    fn = make_log_prob_fn(run, grammar)
    out = [np.zeros(len(seq) - 1, np.float64) for seq in sequences]
    for start in range(0, len(rows), batch_size):
        chunk = np.stack(rows[start:start + batch_size])
        states_chunk = np.stack(states_rows[start:start + batch_size]) if states_rows else None
        n_real = len(chunk)
        if n_real < batch_size:  # one compiled shape: pad the last batch with copies of its first row
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n_real, 0)])
            if states_chunk is not None:
                states_chunk = np.concatenate([states_chunk, np.repeat(states_chunk[:1], batch_size - n_real, 0)])
        got = np.asarray(jax.device_get(fn(run.params, jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:]),
                                            None if states_chunk is None else jnp.asarray(states_chunk))))
        for row, (index, begin, first, end) in zip(got[:n_real], where[start:start + n_real]):
            out[index][first:end] = row[first - begin:end - begin]
    return out


# -- texts ----------------------------------------------------------------------------------------------------


def account_words(tokenizer, texts: Sequence[str], encoded, token_nats: Sequence[np.ndarray]) -> list[ScoredText]:
    """Returns ScoredTexts from each text's (ids, spans) and its token surprisals (nats; the last is <eos>)."""
    scored = []
    for text, (ids, spans), nats in zip(texts, encoded, token_nats):
        words = tokenizer.pre_tokenize(text)
        base_ids = tokenizer.to_base_ids(ids) if hasattr(tokenizer, "to_base_ids") else list(ids)
        base_vocab = getattr(tokenizer, "base", tokenizer).vocab
        if len(base_ids) != len(words):
            raise ValueError(f"the tokenizer's words ({len(base_ids)}) do not line up with pre_tokenize ({len(words)})")
        nats = np.asarray(nats, np.float64)
        bits = nats / LN2
        scored.append(ScoredText(
            words=words, word_bits=charge_words(bits[:-1], spans, len(words)),
            word_status=[word_status(w, base_vocab[i]) for w, i in zip(words, base_ids)],
            tokens=[tokenizer.vocab[i] for i in ids], token_spans=list(spans), token_bits=bits[:-1],
            eos_bits=float(bits[-1])))
    return scored


def score_texts(run: Run, texts: Sequence[str], *, batch_size: int = 32, stride: int | None = None,
                name: str = "", quiet: bool = False) -> list[ScoredText]:
    """Returns each text scored by the run: per-token and per-original-word surprisal (see the module doc)."""
    texts = list(texts)
    started = time.perf_counter()
    encoded = run.tokenizer.encode_with_spans(texts)
    eos = run.tokenizer.eos_id
    sequences = [[eos, *ids, eos] for ids, _ in encoded]
    nats = [-lp for lp in token_log_probs(run, sequences, batch_size=batch_size, stride=stride)]
    scored = account_words(run.tokenizer, texts, encoded, nats)
    seconds = time.perf_counter() - started
    if not quiet:
        n_words = sum(len(s.words) for s in scored)
        print(f"{name or 'run'}: scored {len(texts)} examples ({n_words} words) in {seconds:.1f}s: "
              f"{len(texts) / max(seconds, 1e-9):.1f} examples/s, {n_words / max(seconds, 1e-9):.0f} words/s",
              file=sys.stderr, flush=True)
    return scored


def bits_per_word(scored: Sequence[ScoredText]) -> float:
    """Returns total bits over total original words of the scored texts (the closing <eos> excluded)."""
    n_words = sum(len(s.words) for s in scored)
    return sum(s.bits for s in scored) / max(n_words, 1)
