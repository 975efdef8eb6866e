import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from toyjax.models import bert as bert_lib
from toyjax.models import bert_candidates

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", ".", "un", "##believ", "##able", "##s", "rain", "##bow",
         "##y", "big", "blue"]
CANDIDATES = ["cat", "rainbow", "rainbows", "rainy", "rain", "unbelievable", "dog", "blue"]
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return bert_lib.load(bert_lib.write_random_folder(tmp_path_factory.mktemp("tiny") / "bert", WORDS))


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_hidden_states_match_pytorch_bert_model():
    import torch
    import transformers

    bert = bert_lib.load()
    texts = ["A cat sat on the mat.", "Lily found a needle in her room and wanted to share it with her mom!"]
    ours = bert.hidden_states(texts)
    batch = bert.encode_texts(texts)
    reference = transformers.BertModel.from_pretrained(str(bert_lib.default_path())).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(batch["input_ids"]).long(),
                           attention_mask=torch.tensor(batch["attention_mask"]).long()).last_hidden_state.numpy()
    assert ours.shape == theirs.shape == (2, 128, 384)  # the packaged tokenizer pads to 128
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_saved_mlm_head_matches_pytorch_bert_for_masked_lm(tiny):
    import torch
    import transformers

    ids = np.array([[2, 5, 4, 9, 10, 5, 11, 12, 3]], np.int32)
    ours = np.asarray(tiny.mlm_module.apply({"params": tiny.params}, ids, np.ones_like(ids)))
    reference = transformers.BertForMaskedLM.from_pretrained(str(tiny.folder)).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids).long()).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def brute_force_log_prob(bert, left: str, right: str, candidate: str) -> float:
    """Fills the candidate's pieces one at a time into as many masks, full forward each time, float64 sum."""
    pieces = bert.pieces(candidate)
    left_ids, right_ids = bert.pieces(left), bert.pieces(right)
    total = 0.0
    for j, piece in enumerate(pieces):
        ids = [bert.cls_id, *left_ids, *pieces[:j], *[bert.mask_id] * (len(pieces) - j), *right_ids, bert.sep_id]
        logits = np.asarray(bert.mlm_module.apply({"params": bert.params}, np.array([ids]), np.ones((1, len(ids)))),
                            np.float64)[0, 1 + len(left_ids) + j]
        total += logits[piece] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    return total


def test_chain_rule_equals_brute_force_loop(tiny):
    assert len(tiny.pieces("unbelievable")) == 3 and len(tiny.pieces("rainbows")) == 3
    names, scores = bert_candidates.candidate_log_scores(tiny, ["the [MASK] sat on the mat ."], CANDIDATES)
    expected = [brute_force_log_prob(tiny, "the ", " sat on the mat .", c) for c in names]
    np.testing.assert_allclose(scores[0], expected, atol=1e-4)
    distribution = tiny.candidate_distribution("the [MASK] sat on the mat .", CANDIDATES)
    reference = np.exp(expected - np.max(expected))
    np.testing.assert_allclose([distribution[c] for c in names], reference / reference.sum(), atol=1e-5)


def test_packed_rows_of_several_sentences_equal_separate_brute_force(tiny, monkeypatch):
    # A small pack length forces rows of different sentences and lengths to share sequences and batches, and
    # the longest sentence's rows (18 pieces) past it into sequences of their own.
    monkeypatch.setattr(bert_candidates, "PACK_LENGTH", 16)
    monkeypatch.setattr(bert_candidates, "PACK_BATCH", 2)
    contexts = [("the ", " sat on the mat ."), ("", " ."), ("a big blue ", " sat on a big blue mat . the dog sat")]
    names, scores = bert_candidates.candidate_log_scores(tiny, [f"{l}[MASK]{r}" for l, r in contexts], CANDIDATES)
    expected = [[brute_force_log_prob(tiny, l, r, c) for c in names] for l, r in contexts]
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_pack_rows_places_every_row_once_within_capacity():
    lengths = np.random.default_rng(0).integers(3, 30, 200)
    bins = bert_candidates.pack_rows(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert max(lengths[b].sum() for b in bins) <= 64
    assert len(bins) <= -(-lengths.sum() // 64) + 2  # first-fit decreasing wastes little here
    with pytest.raises(ValueError, match="does not fit"):
        bert_candidates.pack_rows([65], 64)


def test_candidates_sharing_a_first_piece_stay_distinct_and_sum_to_one(tiny):
    shared = ["rain", "rainbow", "rainbows", "rainy"]  # all start with the piece "rain"
    distribution = tiny.candidate_distribution("a big [MASK] .", shared)
    assert list(distribution) == shared
    assert len(set(np.round(list(distribution.values()), 12))) == 4
    assert abs(sum(distribution.values()) - 1) < 1e-9


def test_most_probable_is_argmax_of_the_full_distribution(tiny):
    texts = ["the [MASK] sat on the mat .", "a big [MASK] .", "[MASK] the dog", "blue [MASK]"]
    full = bert_candidates.candidate_distributions(tiny, texts, CANDIDATES)
    assert bert_candidates.most_probable(tiny, texts, CANDIDATES) == [max(d, key=d.get) for d in full]


def test_vocabulary_distribution_over_a_word_list(tiny):
    vocab = ["<pad>", "<unk>", "<eos>", "cat", "dog", "rainbow", "."]
    probs = tiny.vocabulary_distribution(bert_candidates.mask_word(["the", "cat", "sat"], 1), vocab)
    assert probs.shape == (7,) and np.all(probs[:3] == 0) and abs(probs.sum() - 1) < 1e-9
    expected = tiny.candidate_distribution("the [MASK] sat", vocab[3:])
    np.testing.assert_allclose(probs[3:], [expected[w] for w in vocab[3:]], atol=1e-9)


def test_bad_masked_text_or_candidates_are_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"exactly one \[MASK\]"):
        tiny.candidate_distribution("the cat sat", ["dog"])
    with pytest.raises(ValueError, match=r"exactly one \[MASK\]"):
        tiny.candidate_distribution("[MASK] [MASK]", ["dog"])
    with pytest.raises(ValueError, match="empty candidate list"):
        tiny.candidate_distribution("the [MASK] sat", [])
    with pytest.raises(ValueError, match="no word-pieces"):
        tiny.candidate_distribution("the [MASK] sat", ["cat", "  "])


def _rewrite(tmp_path, source, edit):
    folder = bert_lib.write_random_folder(tmp_path / "edited", WORDS)
    tensors = load_file(str(source.folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_missing_tensor_is_a_clear_error(tmp_path, tiny):
    folder = _rewrite(tmp_path, tiny, lambda t: t.pop("bert.encoder.layer.1.attention.self.key.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'encoder.layer.1.attention.self.key.weight'"):
        bert_lib.load(folder)


def test_mis_shaped_tensor_is_a_clear_error(tmp_path, tiny):
    def shrink(tensors):
        tensors["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((63, 32), np.float32)

    with pytest.raises(ValueError, match=r"'encoder.layer.0.intermediate.dense.weight' has shape \(63, 32\), expected \(64, 32\)"):
        bert_lib.load(_rewrite(tmp_path, tiny, shrink))


def test_unexpected_tensor_is_a_clear_error(tmp_path, tiny):
    def add(tensors):
        tensors["bert.encoder.layer.0.adapter.weight"] = np.zeros((2, 2), np.float32)

    with pytest.raises(ValueError, match=r"unexpected tensors \['encoder.layer.0.adapter.weight'\]"):
        bert_lib.load(_rewrite(tmp_path, tiny, add))


def test_missing_mlm_head_is_reported_and_encoder_still_works(tmp_path, tiny, capsys):
    def drop_head(tensors):
        for name in [n for n in tensors if n.startswith("cls.")]:
            del tensors[name]

    headless = bert_lib.load(_rewrite(tmp_path, tiny, drop_head))
    assert "has no MLM head" in capsys.readouterr().out
    np.testing.assert_allclose(headless.hidden_states(["the cat sat"]), tiny.hidden_states(["the cat sat"]), atol=1e-6)
    with pytest.raises(ValueError, match="no MLM head"):
        headless.candidate_distribution("the [MASK] sat", ["cat"])


def test_bidirectional_attention_matches_float64_loop_with_padding_and_packed_segments():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(3, 5, 3, 4)) for _ in range(3))
    segments = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 2, 2, 0]])  # plain, padded, two packed rows
    allowed = bert_lib.attention_allowed(jnp.asarray(segments), jnp.asarray(segments))
    out = np.asarray(bert_lib.bidirectional_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), allowed))
    for b in range(3):
        for i in range(5):
            # a query sees its own segment; a padding query sees every real key (Hugging Face's behaviour)
            keep = (segments[b] == segments[b, i]) if segments[b, i] else (segments[b] > 0)
            for h in range(3):
                scores = k[b, keep, h] @ q[b, i, h] / 2.0
                weights = np.exp(scores - scores.max())
                np.testing.assert_allclose(out[b, i, h], weights @ v[b, keep, h] / weights.sum(), atol=1e-5)


def test_adapt_checkpoints_resumes_and_writes_a_loadable_hf_folder(tmp_path, tiny):
    from toyjax import bert_adapt

    base = bert_lib.write_random_folder(tmp_path / "base", WORDS, with_mlm_head=False)
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(["the", "a", "big", "blue", "cat", "dog", "sat", "on", "mat"], 8)) + " ."
                                 for _ in range(300)))
    settings = dict(base=base, batch_size=4, seq_len=16, n_eval=8, save_every=2, eval_every=2)
    first = bert_adapt.adapt(corpus, tmp_path / "run", steps=2, **settings)
    second = bert_adapt.adapt(corpus, tmp_path / "run", steps=3, **settings)
    assert (first["step"], second["step"]) == (2, 3)
    adapted = bert_lib.load(second["hf_folder"])
    assert adapted.has_mlm_head
    assert abs(sum(adapted.candidate_distribution("the [MASK] sat .", ["cat", "rainbow"]).values()) - 1) < 1e-9
    if HAS_TORCH:
        import torch
        import transformers

        ids = np.array([[2, 5, 4, 9, 3]], np.int32)
        reference = transformers.BertForMaskedLM.from_pretrained(second["hf_folder"]).eval()
        with torch.no_grad():
            theirs = reference(input_ids=torch.tensor(ids).long()).logits.numpy()
        ours = np.asarray(adapted.mlm_module.apply({"params": adapted.params}, ids, np.ones_like(ids)))
        assert np.abs(ours - theirs).max() <= 1e-4


def test_adapt_command_line_flags_reach_training(tmp_path):
    from toyjax import bert_adapt

    base = bert_lib.write_random_folder(tmp_path / "base", WORDS, with_mlm_head=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {w} cat sat on the mat {i} ." for i, w in enumerate(["big", "blue"] * 150)))
    common = ["--corpus", str(corpus), "--base", str(base), "--batch-size", "2", "--seq-len", "16"]
    summary = bert_adapt.main([*common, "--workdir", str(tmp_path / "run"), "--steps", "3", "--mask-rate", "0.5",
                               "--eval-every", "2", "--save-every", "1"])
    assert summary["step"] == 3
    import json

    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert (settings["mask_rate"], settings["masked_per_row"], settings["batch_size"]) == (0.5, 7, 2)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["split"] == "valid"] == [0, 2, 3]
    assert sorted(int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir() if d.name.isdigit()) == [2, 3]
    from toyjax.config import ConfigError

    # Resuming with other settings is refused, naming each difference; settings.json keeps the run's own.
    saved = (tmp_path / "run" / "settings.json").read_text()
    with pytest.raises(ConfigError, match=r"(?s)holds a bert-adapt run with other settings.*"
                                          r"mask_rate: workdir has 0.5, config asks 0.25.*masked_per_row: workdir has 7"):
        bert_adapt.main([*common, "--workdir", str(tmp_path / "run"), "--steps", "4", "--mask-rate", "0.25"])
    assert (tmp_path / "run" / "settings.json").read_text() == saved

    with pytest.raises(ConfigError, match="mask_rate"):
        bert_adapt.adapt(corpus, tmp_path / "bad", base=base, mask_rate=1.5)
    with pytest.raises(ConfigError, match=r"mask_rate must be in \(0, 1\], got 0.0"):
        bert_adapt.main([*common, "--workdir", str(tmp_path / "bad"), "--mask-rate", "0"])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("the cat sat .\n")
    from toyjax.data.text import CorpusError

    with pytest.raises(CorpusError, match="empty"):
        bert_adapt.adapt(tmp_path / "empty.txt", tmp_path / "bad", base=base)
    with pytest.raises(CorpusError, match="too small"):
        bert_adapt.adapt(tmp_path / "short.txt", tmp_path / "bad", base=base)


def test_contextual_simplifier_picks_the_masked_lm_argmax_over_top_words(tiny):
    import collections

    from toyjax.tokenizers.contextual import ContextualSimplifier
    from toyjax.tokenizers.simplify import STRATEGIES

    assert STRATEGIES["contextual"] is ContextualSimplifier
    top_words = ["the", "a", "cat", "dog", "sat", "on", "mat", ".", "rainbow", "blue"]
    documents = [["the", "zebra", "sat", "on", "the", "mat", "."], ["a", "blue", "okapi", "."]]
    simplifier = ContextualSimplifier(model_path=tiny.folder)
    simplifier.fit(collections.Counter(w for d in documents for w in d), top_words, documents)
    chosen = simplifier.simplify_occurrences([(documents[0], 1), (documents[1], 2), (["zebra"], 0)])
    words = [w for w in top_words if w.isalpha()]
    expected = [tiny.candidate_distribution(text, words) for text in ("the [MASK] sat on the mat .", "a blue [MASK] .")]
    assert chosen[:2] == [max(d, key=d.get) for d in expected]
    assert chosen[2] == chosen[0]  # no context: the word's most frequent choice at fit time
    restored = ContextualSimplifier.from_state(simplifier.state())
    assert restored.simplify_occurrences([(documents[1], 2)]) == [chosen[1]]
