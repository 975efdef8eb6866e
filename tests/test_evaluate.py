import math

import jax
import numpy as np
import pytest

from toyjax import evaluate
from toyjax.config import Config
from toyjax.models.decoder import Decoder
from toyjax.runs import Run
from toyjax.testing import bigram_logits, bigram_run
from toyjax.tokenizers import PhraseTokenizer, TopWordTokenizer
from toyjax.tokenizers.simplify import UnkStrategy
from toyjax.models.decoder import init_params
from toyjax.train import make_eval_step

LN2 = math.log(2)


def tiny_tokenizer():
    """the/dog/saw/a/./cat are top words; "puppy" is simplified to "dog"; "zebra" becomes <unk>."""
    tokenizer = TopWordTokenizer.fit(["the dog saw a cat .", "a dog saw the cat ."], vocab_size=20, simplify="unk")
    tokenizer.strategy = UnkStrategy({"puppy": "dog"})
    return tokenizer


TEXT = "The puppy saw a zebra."  # words: the puppy saw a zebra .


def test_bits_per_word_by_hand_for_words_simplified_and_unknown_words():
    tokenizer = tiny_tokenizer()
    [(ids, spans)] = tokenizer.encode_with_spans([TEXT])
    assert [tokenizer.vocab[i] for i in ids] == ["the", "dog", "saw", "a", "<unk>", "."]
    nats = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # six tokens, then the closing <eos>
    [scored] = evaluate.account_words(tokenizer, [TEXT], [(ids, spans)], [nats])
    assert scored.words == ["the", "puppy", "saw", "a", "zebra", "."]
    assert scored.word_status == ["word", "simplified", "word", "word", "unk", "word"]
    # Each word pays its own token: 1..6 nats; the <eos> (7 nats) is reported apart, not charged to a word.
    np.testing.assert_allclose(scored.word_bits, np.array([1, 2, 3, 4, 5, 6]) / LN2)
    assert scored.eos_bits == pytest.approx(7 / LN2)
    assert scored.bits_per_word == pytest.approx(21 / LN2 / 6)


def test_bits_per_word_by_hand_for_a_phrase_token():
    base = tiny_tokenizer()
    t = base.token_to_id
    tokenizer = PhraseTokenizer(base, [(t["the"], t["dog"])])  # one phrase: "the_dog"
    [(ids, spans)] = tokenizer.encode_with_spans([TEXT])
    assert [tokenizer.vocab[i] for i in ids] == ["the_dog", "saw", "a", "<unk>", "."]
    assert spans == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    nats = np.array([3.0, 1.0, 2.0, 8.0, 0.5, 4.0])
    [scored] = evaluate.account_words(tokenizer, [TEXT], [(ids, spans)], [nats])
    # "the_dog" costs 3 nats, spread evenly: 1.5 to "the", 1.5 to "puppy" (simplified to "dog" under it).
    np.testing.assert_allclose(scored.word_bits, np.array([1.5, 1.5, 1.0, 2.0, 8.0, 0.5]) / LN2)
    assert scored.word_status == ["word", "simplified", "word", "word", "unk", "word"]
    assert scored.bits_per_word == pytest.approx(14.5 / LN2 / 6)


def test_window_plan_scores_every_target_once():
    for n, length, stride in [(1, 4, 2), (4, 4, 2), (5, 4, 2), (23, 8, 3), (23, 8, 8), (9, 8, 1)]:
        covered = np.zeros(n, int)
        for begin, end, first in evaluate.window_plan(n, length, stride):
            assert end - begin <= length and begin <= first <= end
            covered[first:end] += 1
        assert (covered == 1).all(), (n, length, stride, covered)


def test_score_texts_matches_a_bigram_table_across_windows_and_batches():
    tokenizer = TopWordTokenizer.fit(["the dog saw a cat . a cat ran to the dog ."] * 3, vocab_size=20, simplify="unk")
    rng = np.random.default_rng(0)
    table = rng.normal(size=(tokenizer.vocab_size, tokenizer.vocab_size)) * 2
    run = bigram_run(tokenizer, table, max_len=4)  # texts of up to 14 tokens need several windows
    texts = ["the dog saw a cat .", "a cat ran to the dog . the dog saw a cat .", "cat", "the zebra ran ."]
    scored = evaluate.score_texts(run, texts, batch_size=3, quiet=True)
    log_probs = table - np.log(np.exp(table).sum(1, keepdims=True))  # float64 reference
    for text, s in zip(texts, scored):
        seq = [tokenizer.eos_id, *tokenizer.encode(text), tokenizer.eos_id]
        expected = [-log_probs[a, b] / LN2 for a, b in zip(seq, seq[1:])]
        np.testing.assert_allclose(np.append(s.token_bits, s.eos_bits), expected, rtol=1e-5)
    assert evaluate.bits_per_word(scored) == pytest.approx(
        sum(s.word_bits.sum() for s in scored) / sum(len(s.words) for s in scored))


def tiny_decoder_run(max_len: int):
    tokenizer = TopWordTokenizer.fit(["the dog saw a cat . a cat ran to the dog ."], vocab_size=20, simplify="unk")
    cfg = Config()
    cfg.model.vocab_size, cfg.model.max_len = tokenizer.vocab_size, max_len
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = 16, 2, 2, 32
    model = Decoder(cfg.model)
    return Run(cfg, init_params(model, cfg.train.seed), tokenizer, 0, model)


def test_log_probs_agree_with_the_training_eval_step():
    run = tiny_decoder_run(max_len=8)
    eval_step = jax.jit(make_eval_step(run.model, run.config))
    rng = np.random.default_rng(1)
    rows = rng.integers(3, run.tokenizer.vocab_size, size=(5, 9)).astype(np.int32)  # 8 inputs + 8 targets each
    ours = evaluate.token_log_probs(run, rows, batch_size=2)
    for row, lp in zip(rows, ours):
        out = eval_step(run.params, {"inputs": row[None, :-1], "targets": row[None, 1:]})
        assert -lp.sum() == pytest.approx(float(out["nll"]), rel=1e-5)


def test_sliding_windows_equal_a_per_token_brute_force():
    max_len, stride = 6, 2
    run = tiny_decoder_run(max_len=max_len)
    seq = np.random.default_rng(2).integers(3, run.tokenizer.vocab_size, size=20).astype(np.int32)
    [ours] = evaluate.token_log_probs(run, [seq], batch_size=4, stride=stride)
    for t in range(len(seq) - 1):
        # Target t is scored by the first window (starts 0, stride, 2*stride, ...) that holds input t.
        begin = max(0, -(-(t - max_len + 1) // stride)) * stride
        logits = run.model.apply({"params": run.params}, seq[None, begin:t + 1])
        log_probs = jax.nn.log_softmax(np.asarray(logits[0, -1], np.float64))
        assert ours[t] == pytest.approx(float(log_probs[seq[t + 1]]), abs=1e-4), t


def test_bigram_helper_is_a_normalised_count_model():
    tokenizer = TopWordTokenizer.fit(["a b a ."], vocab_size=10, simplify="unk")
    table = bigram_logits(tokenizer, ["a b a ."], smoothing=0.0 + 1e-9)
    t = tokenizer.token_to_id
    assert math.exp(table[t["a"], t["b"]]) == pytest.approx(0.5, rel=1e-6)  # "a" is followed by "b" and "."
    np.testing.assert_allclose(np.exp(table).sum(1), 1.0, rtol=1e-6)
