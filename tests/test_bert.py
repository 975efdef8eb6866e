import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from toyjax import bert as bert_lib
from toyjax.bert import candidates as bert_candidates
from toyjax.bert.model import attention_allowed, bidirectional_attention
from toyjax.metrics import read_metrics

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
    distribution = bert_lib.candidate_distribution(tiny, "the [MASK] sat on the mat .", CANDIDATES)
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
    distribution = bert_lib.candidate_distribution(tiny, "a big [MASK] .", shared)
    assert list(distribution) == shared
    assert len(set(np.round(list(distribution.values()), 12))) == 4
    assert abs(sum(distribution.values()) - 1) < 1e-9


def test_most_probable_is_argmax_of_the_full_distribution(tiny):
    texts = ["the [MASK] sat on the mat .", "a big [MASK] .", "[MASK] the dog", "blue [MASK]"]
    full = bert_candidates.candidate_distributions(tiny, texts, CANDIDATES)
    assert bert_candidates.most_probable(tiny, texts, CANDIDATES) == [max(d, key=d.get) for d in full]


def test_vocabulary_distribution_over_a_word_list(tiny):
    vocab = ["<pad>", "<unk>", "<eos>", "cat", "dog", "rainbow", "."]
    probs = bert_lib.vocabulary_distribution(tiny, bert_candidates.mask_word(["the", "cat", "sat"], 1), vocab)
    assert probs.shape == (7,) and np.all(probs[:3] == 0) and abs(probs.sum() - 1) < 1e-9
    expected = bert_lib.candidate_distribution(tiny, "the [MASK] sat", vocab[3:])
    np.testing.assert_allclose(probs[3:], [expected[w] for w in vocab[3:]], atol=1e-9)


def test_bad_masked_text_or_candidates_are_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"exactly one \[MASK\]"):
        bert_lib.candidate_distribution(tiny, "the cat sat", ["dog"])
    with pytest.raises(ValueError, match=r"exactly one \[MASK\]"):
        bert_lib.candidate_distribution(tiny, "[MASK] [MASK]", ["dog"])
    with pytest.raises(ValueError, match="empty candidate list"):
        bert_lib.candidate_distribution(tiny, "the [MASK] sat", [])
    with pytest.raises(ValueError, match="no word-pieces"):
        bert_lib.candidate_distribution(tiny, "the [MASK] sat", ["cat", "  "])


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
        bert_lib.candidate_distribution(headless, "the [MASK] sat", ["cat"])


def test_bidirectional_attention_matches_float64_loop_with_padding_and_packed_segments():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(3, 5, 3, 4)) for _ in range(3))
    segments = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 2, 2, 0]])  # plain, padded, two packed rows
    allowed = attention_allowed(jnp.asarray(segments), jnp.asarray(segments))
    out = np.asarray(bidirectional_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), allowed))
    for b in range(3):
        for i in range(5):
            # a query sees its own segment; a padding query sees every real key (Hugging Face's behaviour)
            keep = (segments[b] == segments[b, i]) if segments[b, i] else (segments[b] > 0)
            for h in range(3):
                scores = k[b, keep, h] @ q[b, i, h] / 2.0
                weights = np.exp(scores - scores.max())
                np.testing.assert_allclose(out[b, i, h], weights @ v[b, keep, h] / weights.sum(), atol=1e-5)


def test_contextual_simplifier_picks_the_masked_lm_argmax_over_top_words(tiny):
    import collections

    from toyjax.tokenizers.contextual import ContextualSimplifier
    from toyjax.tokenizers.simplify import get_strategy

    assert get_strategy("contextual") is ContextualSimplifier
    top_words = ["the", "a", "cat", "dog", "sat", "on", "mat", ".", "rainbow", "blue"]
    documents = [["the", "zebra", "sat", "on", "the", "mat", "."], ["a", "blue", "okapi", "."]]
    simplifier = ContextualSimplifier(model_path=tiny.folder)
    simplifier.fit(collections.Counter(w for d in documents for w in d), top_words, documents)
    chosen = simplifier.simplify_occurrences([(documents[0], 1), (documents[1], 2), (["zebra"], 0)])
    words = [w for w in top_words if w.isalpha()]
    expected = [bert_lib.candidate_distribution(tiny, text, words) for text in ("the [MASK] sat on the mat .", "a blue [MASK] .")]
    assert chosen[:2] == [max(d, key=d.get) for d in expected]
    assert chosen[2] == chosen[0]  # no context: the word's most frequent choice at fit time
    restored = ContextualSimplifier.from_state(simplifier.state())
    assert restored.simplify_occurrences([(documents[1], 2)]) == [chosen[1]]


# ------------------------------------------------------------------------------------------ bert-adapt
ADAPT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "bert_adapt.py"


def _adapt_setup(tmp_path):
    """Returns (base folder without an MLM head, corpus file) for tiny adaptation runs."""
    base = bert_lib.write_random_folder(tmp_path / "base", WORDS, with_mlm_head=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {w} cat sat on the mat {i} ." for i, w in enumerate(["big", "blue"] * 150)))
    return base, corpus


def _tiny_overrides(base, corpus, **more):
    values = dict(corpus=corpus, base=base, batch_size=2, seq_len=16, n_eval=8, time_budget_min=0, **more)
    return [f"--config.bert_adapt.{key}={value}" for key, value in values.items()]


def test_adapt_checkpoints_resumes_and_writes_a_loadable_hf_folder(tmp_path):
    from toyjax.bert import adapt
    from toyjax.config import apply_overrides, load_config_file

    base, corpus = _adapt_setup(tmp_path)
    config = lambda steps: apply_overrides(load_config_file(ADAPT_CONFIG), _tiny_overrides(
        base, corpus, steps=steps, save_every=2, eval_every=2))
    first = adapt.run(config(2), tmp_path / "run")
    second = adapt.run(config(3), tmp_path / "run")  # more steps: resumes from step 2
    assert (first["step"], second["step"]) == (2, 3)
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"] == [1, 2, 3]
    adapted = bert_lib.load(second["hf_folder"])
    assert adapted.has_mlm_head
    assert abs(sum(bert_lib.candidate_distribution(adapted, "the [MASK] sat .", ["cat", "rainbow"]).values()) - 1) < 1e-9
    if HAS_TORCH:
        import torch
        import transformers

        ids = np.array([[2, 5, 4, 9, 3]], np.int32)
        reference = transformers.BertForMaskedLM.from_pretrained(second["hf_folder"]).eval()
        with torch.no_grad():
            theirs = reference(input_ids=torch.tensor(ids).long()).logits.numpy()
        ours = np.asarray(adapted.mlm_module.apply({"params": adapted.params}, ids, np.ones_like(ids)))
        assert np.abs(ours - theirs).max() <= 1e-4


def test_bert_adapt_command_overrides_reach_training(tmp_path, monkeypatch, capsys):
    import launch
    from toyjax.bert import adapt

    base, corpus = _adapt_setup(tmp_path)
    masked_per_row = []
    real_masked_batch = adapt.masked_batch

    def spy(windows, step, seed, batch_size, n_masked, *rest):
        masked_per_row.append((batch_size, n_masked, windows.shape[1]))
        return real_masked_batch(windows, step, seed, batch_size, n_masked, *rest)

    monkeypatch.setattr(adapt, "masked_batch", spy)
    command = ["bert-adapt", "--config", str(ADAPT_CONFIG), "--workdir", str(tmp_path / "run")]
    tiny = _tiny_overrides(base, corpus, eval_every=2, save_every=1)
    assert launch.main([*command, *tiny, "--config.bert_adapt.steps=3", "--config.bert_adapt.mask_rate=0.5"]) == 0
    assert set(masked_per_row) == {(2, 7, 16)}  # 0.5 of the 14 pieces between [CLS] and [SEP]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["bert_adapt"]
    assert (saved["mask_rate"], saved["steps"], saved["corpus"]) == (0.5, 3, str(corpus))
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["split"] == "valid"] == [0, 2, 3]
    assert sorted(int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir() if d.name.isdigit()) == [2, 3]

    # Resuming with another mask rate is refused in one line per difference; config.json keeps the run's own.
    capsys.readouterr()
    before = (tmp_path / "run" / "config.json").read_text()
    assert launch.main([*command, *tiny, "--config.bert_adapt.steps=4", "--config.bert_adapt.mask_rate=0.25"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'run'} holds a different bert-adapt run")
    assert "bert_adapt.mask_rate: workdir has 0.5, config asks 0.25" in err and "steps" not in err
    assert (tmp_path / "run" / "config.json").read_text() == before


@pytest.mark.parametrize("override, message", [
    ("--config.bert_adapt.mask_rate=0", r"bert_adapt.mask_rate=0.0 must be in (0, 1]"),
    ("--config.bert_adapt.mask_rate=1.5", r"bert_adapt.mask_rate=1.5 must be in (0, 1]"),
    ("--config.bert_adapt.mask_rat=0.3", "unknown config key 'bert_adapt.mask_rat'; did you mean 'bert_adapt.mask_rate'?"),
    ("--config.bert_adapt.steps=0", "bert_adapt.steps=0 must be >= 1"),
    ("--config.bert_adapt.seq_len=65", "bert_adapt.seq_len=65 exceeds the model's 64 positions"),
    ("--config.bert_adapt.corpus=", "bert_adapt.corpus is required"),
    ("--config.bert_adapt.corpus=MISSING", "bert_adapt.corpus: file MISSING does not exist"),
    ("--config.bert_adapt.base=MISSING", "bert_adapt.base: MISSING is not a Hugging Face BERT folder"),
    ("--config.bert_adapt.corpus=EMPTY", "corpus file EMPTY is empty"),
    ("--config.bert_adapt.corpus=SHORT", "SHORT: too small to adapt on"),
])
def test_bert_adapt_bad_config_or_corpus_is_one_line_and_makes_no_workdir(tmp_path, capsys, override, message):
    import launch

    base, corpus = _adapt_setup(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("the cat sat .\n")
    files = {"MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty.txt", "SHORT": tmp_path / "short.txt"}
    for name, path in files.items():
        override, message = override.replace(name, str(path)), message.replace(name, str(path))
    command = ["bert-adapt", "--config", str(ADAPT_CONFIG), "--workdir", str(tmp_path / "run")]
    assert launch.main([*command, *_tiny_overrides(base, corpus), override]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
