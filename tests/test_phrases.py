"""Phrase tokenizer: merges follow the documented score (checked against a brute-force learner), encoding is
exact and reversible to the top-word tokens, bits per word are accounted by hand, save/load round-trips."""

import json
import math
import random

import numpy as np
import pytest
from conftest import CORPORA

from toyjax.tokenizers import TopWordTokenizer, load_tokenizer
from toyjax.tokenizers.phrases import (PhraseTokenizer, apply_merges, bits_per_word, count_words, learn_merges,
                                      split_runs)

PUNCT = {".", ",", "!", "?", '"'}


# -- an independent, deliberately naive reference learner --------------------------------------------------------


def brute_force_merges(sentences: list[list[str]], n_merges: int, min_count: int, min_npmi: float, max_words: int):
    """Recounts everything from scratch each step; returns merged pairs as (left words, right words)."""
    runs, run = [], []
    for sentence in sentences:  # cut at punctuation, exactly as documented
        for word in sentence + ["."]:
            if word in PUNCT:
                if run:
                    runs.append(run)
                run = []
            else:
                run.append((word,))
    merges = []
    for _ in range(n_merges):
        unigram, pairs = {}, {}
        for r in runs:
            for token in r:
                unigram[token] = unigram.get(token, 0) + 1
            for i in range(len(r) - 1):
                pairs[(r[i], r[i + 1])] = pairs.get((r[i], r[i + 1]), 0) + 1
        total = sum(unigram.values())
        best = None
        for (a, b), count in pairs.items():
            if count < min_count or len(a) + len(b) > max_words:
                continue
            p_ab = count / total
            cohesion = math.log(p_ab / ((unigram[a] / total) * (unigram[b] / total))) / -math.log(p_ab)
            if cohesion < min_npmi:
                continue
            key = (-count * cohesion, "_".join(a), "_".join(b))
            if best is None or key < best[0]:
                best = (key, (a, b))
        if best is None:
            break
        a, b = best[1]
        merges.append((a, b))
        new_runs = []
        for r in runs:
            out, i = [], 0
            while i < len(r):
                if i + 1 < len(r) and r[i] == a and r[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(r[i])
                    i += 1
            new_runs.append(out)
        runs = new_runs
    return merges


def fit_pair(texts, n_phrases, **kwargs):
    base = TopWordTokenizer.fit(texts, vocab_size=500, simplify="unk")
    return base, PhraseTokenizer.fit(texts, base=base, n_phrases=n_phrases, **kwargs)


def learned_as_words(tokenizer):
    return [(tuple(tokenizer.token_words(a)), tuple(tokenizer.token_words(b))) for a, b in tokenizer.merges]


# -- hand-made corpora -------------------------------------------------------------------------------------------

# "the cat" is the most frequent pair (12) but "the" and "cat" also occur apart; "once upon" (8) never does.
FIRST_MERGE = (["once upon a time the cat sat ."] * 8 + ["the cat ran to the dog ."] * 4
        + ["a dog saw the bird and a cat ."] * 6 + ["time to sleep , said the dog ."] * 3)


# A small story-like corpus with reusable phrases in varied contexts.
HAND = (["once upon a time the cat sat ."] * 3 + ["once upon a time a dog ran home ."] * 3
        + ["once upon a time there was a bird ."] * 2 + ["the cat ran to the dog ."] * 4
        + ["a dog saw the bird and a cat ."] * 3 + ["time to sleep , said the dog ."] * 3
        + ["the bird sat on the cat !"] * 2 + ["a cat and a dog ran to the bird ."] * 2)


def test_first_merge_by_hand_cohesion_beats_raw_frequency():
    base, tok = fit_pair(FIRST_MERGE, n_phrases=1, min_count=2, min_npmi=0.0)
    words = [w for t in FIRST_MERGE for w in t.split() if w not in PUNCT]
    total = len(words)  # 8*7 + 4*6 + 6*8 + 3*6 word tokens (punctuation is not counted)
    assert total == 56 + 24 + 48 + 18
    c = words.count

    def score(pair_count, a, b):
        p = pair_count / total
        return pair_count * math.log(p / (c(a) / total * c(b) / total)) / -math.log(p)

    # counts read off the corpus by eye: "the cat" 8 + 4 = 12 times, "once upon" 8 times
    assert score(12, "the", "cat") < score(8, "once", "upon")
    assert learned_as_words(tok) == [(("once",), ("upon",))]
    assert tok.merge_records[0]["count"] == 8
    assert tok.merge_records[0]["score"] == pytest.approx(score(8, "once", "upon"), rel=1e-12)


def test_merges_match_brute_force_on_hand_corpus():
    base, tok = fit_pair(HAND, n_phrases=12, min_count=2, min_npmi=0.1, max_words=4)
    sentences = [base.pre_tokenize(t) for t in HAND]
    expected = brute_force_merges(sentences, 12, min_count=2, min_npmi=0.1, max_words=4)
    assert len(expected) == 12
    assert learned_as_words(tok) == expected
    assert {"once_upon_a_time", "time_to_sleep", "the_cat"} <= set(tok.vocab)


def test_merges_match_brute_force_on_random_corpus_with_planted_phrases():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    planted = [["big", "red", "ball"], ["far", "far", "away"], ["ice", "cream"]]
    texts = []
    for _ in range(150):
        sentence = [rng.choice(words) for _ in range(rng.randint(3, 8))]
        if rng.random() < 0.5:
            sentence[rng.randrange(len(sentence)):0] = rng.choice(planted)
        texts.append(" ".join(sentence) + rng.choice([" .", " !", " , x ."]))
    base, tok = fit_pair(texts, n_phrases=15, min_count=3, min_npmi=0.05, max_words=3)
    expected = brute_force_merges([base.pre_tokenize(t) for t in texts], 15, 3, 0.05, 3)
    assert learned_as_words(tok) == expected
    assert {"big_red_ball", "far_far_away", "ice_cream"} <= set(tok.vocab)
    assert all(len(tok.token_words(i)) <= 3 for i in range(tok.vocab_size))


def test_no_merge_across_punctuation_or_specials():
    texts = ["stop . go home"] * 20 + ["go home , stop !"] * 5
    base, tok = fit_pair(texts, n_phrases=10, min_count=2, min_npmi=-1.0)
    for i in range(base.vocab_size, tok.vocab_size):
        assert not set(tok.token_words(i)) & (PUNCT | {"<eos>", "<unk>", "<pad>"})
    assert tok.vocab[base.vocab_size:] == ["go_home"]  # "stop . go" is frequent but crosses a full stop
    eos_run = [base.token_to_id["stop"], tok.eos_id, base.token_to_id["go"], base.token_to_id["home"]]
    assert tok.to_base_ids(tok.phrase_ids_from_base(eos_run)) == eos_run


# -- encoding ----------------------------------------------------------------------------------------------------


def sequential_reference(base_ids, tok):
    """Applies the merges one after another over the whole id list (independent of apply_merges' ranking)."""
    ids = list(base_ids)
    for k, (a, b) in enumerate(tok.merges):
        new, out, i = tok.base_vocab_size + k, [], 0
        while i < len(ids):
            if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                out.append(new)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out
    return ids


def test_round_trip_to_top_word_tokens_and_text():
    base, tok = fit_pair(HAND, n_phrases=12, min_count=2)
    unseen = ["Once upon a time, a zebra sat.", "the cat ran to the dog and the bird", "", "!!", "time to sleep"]
    for text in HAND + unseen:
        ids = tok.encode(text)
        base_ids = base.encode(text)
        assert tok.to_base_ids(ids) == base_ids
        assert ids == sequential_reference(base_ids, tok)
        assert tok.decode(ids) == base.decode(base_ids)
    assert tok.encode_batch(unseen) == [tok.encode(t) for t in unseen]
    for i in range(tok.vocab_size):  # every token reads as its words
        assert tok.vocab[i] == "_".join(tok.token_words(i)) or i < base.vocab_size
    assert tok.tokens("Once upon a time the cat sat.") == ["once_upon_a_time", "the_cat", "sat", "."]
    with pytest.raises(ValueError, match="outside the phrase vocabulary"):
        tok.decode([tok.vocab_size])


def test_training_segmentation_equals_encode_segmentation():
    base, tok = fit_pair(HAND, n_phrases=12, min_count=2)
    runs = [r for t in HAND for is_run, r in split_runs(base.encode(t), tok.mergeable) if is_run]
    _, _, final_runs = learn_merges(runs, base.vocab_size, 12, min_count=2, min_npmi=0.2, max_words=4,
                                    names=base.vocab)
    encoded = {}
    for r in runs:
        seg = tuple(apply_merges(list(r), tok._ranks))
        encoded[seg] = encoded.get(seg, 0) + 1
    assert dict(final_runs) == encoded


def test_fit_arguments_are_checked():
    base = TopWordTokenizer.fit(HAND, vocab_size=500, simplify="unk")
    with pytest.raises(ValueError, match="n_phrases"):
        PhraseTokenizer.fit(HAND, base=base, vocab_size=10)
    with pytest.raises(ValueError, match="exactly one"):
        PhraseTokenizer.fit(HAND, base=base)
    tok = PhraseTokenizer.fit(HAND, base=base, vocab_size=base.vocab_size + 3, min_count=2)
    assert tok.vocab_size == base.vocab_size + 3


# -- bits per word -----------------------------------------------------------------------------------------------


def test_bits_per_word_by_hand():
    base, tok = fit_pair(HAND, n_phrases=12, min_count=2)
    text = "once upon a time ."
    ids = tok.encode(text)
    assert [tok.vocab[i] for i in ids] == ["once_upon_a_time", "."]
    n_words = len(tok.to_base_ids(ids))
    assert n_words == 5
    # Phrase model: p(once_upon_a_time) = 1/4, p(.) = 1/2 -> 2 + 1 = 3 bits over 5 words = 0.6 bits/word.
    phrase_nll = -math.log(1 / 4) - math.log(1 / 2)
    assert bits_per_word(phrase_nll, n_words) == pytest.approx(0.6, rel=1e-12)
    # Word model: p = 1/2 for each of the 5 words -> 5 bits / 5 words = 1 bit/word (= its per-token loss in bits).
    assert bits_per_word(5 * math.log(2), 5) == pytest.approx(1.0, rel=1e-12)
    # Mean token loss over a window: 2 tokens averaging 1.5 ln 2 nats -> 3 bits over the window's 5 words.
    assert bits_per_word(np.mean([2 * math.log(2), math.log(2)]) * 2, 5) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="n_words"):
        bits_per_word(1.0, 0)


def test_word_count_of_a_validation_window_by_hand():
    base, tok = fit_pair(HAND, n_phrases=12, min_count=2)
    # A window as the pipeline builds it: documents joined, each followed by <eos>, padded at the end.
    window = tok.encode("Once upon a time the cat sat.") + [tok.eos_id] + tok.encode("A zebra ran") + [tok.pad_id]
    # once_upon_a_time(4) the_cat(2) sat . <eos> a <unk> ran <pad>  -> 4 + 2 + 1 + 1 + 1 + 1 + 1 = 11 words
    assert [tok.vocab[i] for i in window] == ["once_upon_a_time", "the_cat", "sat", ".", "<eos>", "a", "<unk>",
                                              "ran", "<pad>"]
    assert count_words(tok, window) == 11
    assert count_words(base, tok.to_base_ids(window)) == 11
    # Both models pay for the same 11 words: a 9-token phrase window with total NLL 11 ln 2 is 1 bit per word.
    assert bits_per_word(11 * math.log(2), count_words(tok, window)) == pytest.approx(1.0)


# -- stats, save / load -----------------------------------------------------------------------------------------


def test_stats_counted_by_hand():
    base, tok = fit_pair(HAND, n_phrases=12, min_count=2)
    stats = tok.stats(["Once upon a time the cat sat. The cat ran!"])
    # tokens: once_upon_a_time the_cat sat . the_cat ran !  -> 7 tokens; 4 + 2 + 1 + 1 + 2 + 1 + 1 = 12 words
    assert (stats["tokens"], stats["words"], stats["sentences"]) == (7, 12, 2)
    assert stats["mean_words_per_token"] == pytest.approx(12 / 7)
    assert stats["tokens_per_sentence"] == pytest.approx(3.5)
    assert stats["words_in_phrases_share"] == pytest.approx(8 / 12)
    assert stats["top_phrases"][0] == ("the_cat", 2)


def test_save_load_round_trip(tmp_path):
    base, tok = fit_pair(HAND, n_phrases=12, min_count=2)
    tok.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "toyjax_tokenizer.json").read_text())
    assert meta["kind"] == "phrase"
    assert json.loads((tmp_path / "tok" / "base" / "toyjax_tokenizer.json").read_text())["kind"] == "topword"
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, PhraseTokenizer)
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    assert (loaded.pad_id, loaded.unk_id, loaded.eos_id) == (tok.pad_id, tok.unk_id, tok.eos_id)
    for text in HAND + ["a zebra saw the cat once upon a time"]:
        assert loaded.encode(text) == tok.encode(text)
    assert meta["merges"][0] == " ".join(str(i) for i in tok.merges[0])
    meta["merges"][0] = "0 1"  # <pad> + <unk>: not words
    (tmp_path / "tok" / "toyjax_tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit this base"):
        load_tokenizer(tmp_path / "tok")


@pytest.mark.skipif(not (CORPORA / "tinystories_sample.txt").is_file(), reason="needs ../shared/corpora")
def test_tinystories_phrases_are_readable_and_exact():
    stories = (CORPORA / "tinystories_sample.txt").read_text().split("\n\n")[:400]
    train, held_out = stories[:300], stories[300:]
    base = TopWordTokenizer.fit(train, vocab_size=400, simplify="unk")
    tok = PhraseTokenizer.fit(train, base=base, n_phrases=100)
    assert "once_upon_a_time" in tok.token_to_id
    assert tok.stats(held_out)["mean_words_per_token"] > 1.1
    for text in held_out[:50]:
        assert tok.to_base_ids(tok.encode(text)) == base.encode(text)
