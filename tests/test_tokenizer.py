import collections
import itertools
import math

import numpy as np
import pytest
from tokenizers import Tokenizer

from toyjax.tokenizers import TopWordTokenizer, load_tokenizer
from toyjax.tokenizers.simplify import ppmi_context_vectors

# "puppy" appears only in "dog" contexts and "kitten" only in "cat" contexts, each rarer than the top words.
CORPUS = (["the dog ran to the park .", "my dog ate the bone .", "a big dog barked loudly ."] * 20
          + ["the cat sat on the mat .", "my cat ate the fish .", "a big cat purred loudly ."] * 20
          + ["the puppy ran to the park .", "my puppy ate the bone .", "a big kitten purred loudly ."])


def test_vocabulary_is_the_top_words():
    tok = TopWordTokenizer.fit(CORPUS, vocab_size=12, simplify="unk")
    counts = collections.Counter(w for line in CORPUS for w in line.split())
    expected = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:9]
    assert tok.vocab[:3] == ["<pad>", "<unk>", "<eos>"]
    assert tok.vocab[3:] == expected


def test_nearest_simplifies_by_context_and_unk_does_not():
    nearest = TopWordTokenizer.fit(CORPUS, vocab_size=20, simplify="nearest")
    assert "puppy" not in nearest.token_to_id and "dog" in nearest.token_to_id
    assert nearest.simplify("puppy") == "dog"
    assert nearest.simplify("kitten") == "cat"
    assert nearest.simplify("dog") == "dog"
    assert nearest.simplify("zebra") == "<unk>"  # never seen: no context to go on
    assert nearest.words("The puppy ran") == ["the", "dog", "ran"]
    plain = TopWordTokenizer.fit(CORPUS, vocab_size=20, simplify="unk")
    assert plain.words("The puppy ran") == ["the", "<unk>", "ran"]


def test_round_trip_and_readable_decode():
    text = 'Tom said, "I can\'t find my red ball." Then he ran to the park!'
    tok = TopWordTokenizer.fit([text] * 3, vocab_size=100)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.pre_tokenize("Can't stop") == ["can't", "stop"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([10_000])


def test_decode_restores_names_mid_sentence_and_a_reloaded_tokenizer_too(tmp_path):
    from toyjax.data import stories

    tok = TopWordTokenizer.fit(stories.generate_texts(300, seed=0), vocab_size=1000)
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    # Other stories with the same names; those with a word the fitting stories never had would decode to <unk>.
    texts = [t for t in stories.generate_texts(40, seed=1) if all(w in tok.token_to_id for w in tok.pre_tokenize(t))]
    assert sum("named Lily" in t or "named Leo" in t or "named Sara" in t or "named Zoe" in t for t in texts) >= 3
    for text in texts:
        assert "Leo" not in tok.pre_tokenize(text) and "leo" in tok.pre_tokenize(text + " Leo")  # tokens are lowercase
        assert tok.decode(tok.encode(text)) == text
        assert again.decode(again.encode(text)) == text


def test_a_capital_seen_only_at_sentence_starts_stays_there():
    tok = TopWordTokenizer.fit(['The dog saw Rex. The cat ran to the dog and said "The end."'] * 3, vocab_size=30)
    assert tok.surface_forms == {"rex": "Rex"}
    assert tok.decode(tok.encode("the cat saw the dog and rex.")) == "The cat saw the dog and Rex."


def test_stats_match_a_count_by_hand():
    tok = TopWordTokenizer.fit(CORPUS, vocab_size=20, simplify="nearest")
    words = [w for line in CORPUS for w in line.split()]
    in_vocab = sum(w in tok.token_to_id for w in words)
    assert tok.stats["coverage"] == pytest.approx(in_vocab / len(words))
    assert tok.stats["simplified_share"] + tok.stats["unknown_share"] == pytest.approx(1 - in_vocab / len(words))


def test_save_load_and_plain_tokenizers_json(tmp_path):
    tok = TopWordTokenizer.fit(CORPUS, vocab_size=20, simplify="nearest")
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.vocab == tok.vocab and again.simplify("puppy") == "dog"
    assert again.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
    # The vocabulary works outside toyjax: the Hugging Face file gives the same ids for in-vocabulary text.
    plain = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert plain.encode("The dog ran to the park.").ids == tok.encode("The dog ran to the park.")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved toyjax tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="empty corpus"):
        TopWordTokenizer.fit(["", "   "], vocab_size=10)
    with pytest.raises(ValueError, match="unknown simplification strategy"):
        TopWordTokenizer.fit(CORPUS, vocab_size=10, simplify="magic")


def test_ppmi_vectors_match_a_brute_force_count():
    docs = [["a", "b", "c", "a", "b"], ["c", "b", "a"]]
    rows, contexts, window = ["a", "b", "c"], ["a", "b"], 2
    counts = np.zeros((3, 2))
    for words in docs:
        for i, j in itertools.product(range(len(words)), repeat=2):
            if 0 < abs(i - j) <= window and words[j] in contexts:
                counts[rows.index(words[i]), contexts.index(words[j])] += 1
    total = counts.sum()
    ctx = counts.sum(0) ** 0.75 / (counts.sum(0) ** 0.75).sum()
    expected = np.zeros_like(counts)
    for r, c in itertools.product(range(3), range(2)):
        if counts[r, c]:
            expected[r, c] = max(math.log(counts[r, c] / total / (counts[r].sum() / total * ctx[c])), 0)
    expected /= np.maximum(np.linalg.norm(expected, axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(ppmi_context_vectors(docs, rows, contexts, window), expected, atol=1e-6)
