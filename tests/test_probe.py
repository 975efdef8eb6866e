import numpy as np
import pytest

from toyjax import bert as bert_lib
from toyjax.bert import heads

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "bed", "big", "small", "red", "saw", "."]
SENTENCES = [f"the {adjective} {animal} {verb} on a {thing} ." for adjective in ("big", "small", "red")
             for animal in ("cat", "dog") for verb in ("sat", "ran", "saw") for thing in ("mat", "bed")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return bert_lib.load(bert_lib.write_random_folder(tmp_path_factory.mktemp("tiny") / "bert", WORDS))


def test_masked_word_examples_mask_one_word_and_remember_it(tiny):
    examples = heads.masked_word_examples(tiny, SENTENCES, n=20, max_len=16)
    assert len(examples) == 20
    for row, position, piece, word in zip(examples.ids, examples.positions, examples.piece_targets, examples.words):
        assert row[position] == tiny.mask_id and (row == tiny.mask_id).sum() == 1
        assert tiny.pieces(word) == [piece]


def test_features_are_the_encoder_states_at_the_mask(tiny, tmp_path):
    examples = heads.masked_word_examples(tiny, SENTENCES, n=5, max_len=16)
    features = heads.masked_features(tiny, examples, batch_size=4, cache_dir=tmp_path)
    assert features.shape == (3, 5, 32)  # embeddings + 2 layers
    states = tiny.mlm_module.apply({"params": tiny.params}, examples.ids[:1], examples.attention_mask[:1], method="encode")
    np.testing.assert_allclose(features[:, 0], [np.asarray(s)[0, examples.positions[0]] for s in states], atol=1e-5)
    np.testing.assert_array_equal(heads.masked_features(tiny, examples, cache_dir=tmp_path), features)  # cached


def test_feature_cache_is_keyed_by_the_weights(tmp_path):
    cache = tmp_path / "cache"
    first = bert_lib.load(bert_lib.write_random_folder(tmp_path / "model", WORDS, seed=0))
    examples = heads.masked_word_examples(first, SENTENCES, n=5, max_len=16)
    cached = heads.masked_features(first, examples, cache_dir=cache)
    # Another folder with other weights, and the same folder re-written in place (a model adapted again).
    other = bert_lib.load(bert_lib.write_random_folder(tmp_path / "other", WORDS, seed=3))
    rewritten = bert_lib.load(bert_lib.write_random_folder(tmp_path / "model", WORDS, seed=5))
    for bert in (other, rewritten):
        states = bert.mlm_module.apply({"params": bert.params}, examples.ids, examples.attention_mask, method="encode")
        expected = np.stack([np.asarray(s)[np.arange(len(examples)), examples.positions] for s in states])
        assert not np.allclose(expected, cached, atol=1e-3)
        np.testing.assert_allclose(heads.masked_features(bert, examples, cache_dir=cache), expected, atol=1e-5)
    assert len(list(cache.iterdir())) == 3
    np.testing.assert_array_equal(heads.masked_features(first, examples, cache_dir=cache), cached)  # still there


def test_compact_linear_head_follows_the_full_head_exactly():
    rng = np.random.default_rng(0)
    features, targets = rng.normal(size=(24, 8)), rng.choice([3, 7, 11, 40], size=24)
    for batch_size, optimizer in ((None, "adam"), (8, "adam"), (None, "sgd")):
        settings = dict(steps=15, learning_rate=0.05, batch_size=batch_size, optimizer=optimizer)
        full, _ = heads.train_head(features, targets, 50, "linear", **settings)
        compact, _ = heads.train_head(features, targets, 50, "linear", compact_classes=True, **settings)
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(compact["params"][name], full["params"][name], atol=2e-5)


@pytest.mark.parametrize("kind", ["linear", "bert"])
def test_heads_overfit_masked_examples_of_a_frozen_encoder(tiny, kind):
    examples = heads.masked_word_examples(tiny, SENTENCES * 2, n=64, max_len=16)
    features = heads.masked_features(tiny, examples)[-1]
    decoder = np.asarray(tiny.params["word_embeddings"]["embedding"]) if kind == "bert" else None
    head, history = heads.train_head(features, examples.piece_targets, tiny.config.vocab_size, kind, decoder,
                                     steps=400, learning_rate=3e-2, stop_at_train_top1=1.0)
    accuracy = heads.head_accuracy(head, features, examples.piece_targets)
    logits = (features - head["mean"]) / head["std"] @ np.asarray(head["params"]["kernel"]) + np.asarray(head["params"]["bias"]) \
        if kind == "linear" else None
    if logits is not None:  # independent top-1 for the linear head
        assert accuracy["top1"] == (logits.argmax(-1) == examples.piece_targets).mean()
    # masked positions whose context is identical are indistinguishable; the check allows for them
    distinct = {(tuple(r), t) for r, t in zip(examples.ids, examples.piece_targets)}
    contexts = {}
    for row, target in distinct:
        contexts.setdefault(row, set()).add(target)
    best_possible = sum(1 for r, t in zip(examples.ids, examples.piece_targets) if len(contexts[tuple(r)]) == 1) / len(examples)
    assert accuracy["top1"] >= min(0.99, best_possible)


def test_word_targets_and_decoder_for_a_toyjax_vocabulary(tiny):
    class WordVocab:
        vocab = ["<pad>", "<unk>", "<eos>", "cat", "dog", "mat"]
        token_to_id = {w: i for i, w in enumerate(vocab)}
        unk_id = 1

    examples = heads.masked_word_examples(tiny, SENTENCES, n=30, max_len=16)
    targets = heads.word_targets(examples, WordVocab)
    assert [WordVocab.vocab[t] if t != 1 else None for t in targets] == \
        [w if w in ("cat", "dog", "mat") else None for w in examples.words]
    decoder = heads.word_decoder(tiny, WordVocab.vocab)
    np.testing.assert_allclose(decoder[3], np.asarray(tiny.params["word_embeddings"]["embedding"])[tiny.pieces("cat")[0]])
