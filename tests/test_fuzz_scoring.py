import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyjax import evaluate, fuzz, fuzz_scoring, probes as probes_lib
from toyjax.data import pipeline, stories as stories_lib
from toyjax.models.decoder import Decoder, init_params
from toyjax.models.kv_cache import init_cache
from toyjax.runs import Run
from toyjax.testing import bigram_logits, bigram_run, tiny_config

# Every model part a fuzzed run can have: top-k attention (here with rotary positions, whose cached keys carry
# their positions) with the dense FFN, and MoE (with dense attention and learned positions, the defaults), whose
# capacity binds, so its expert counts matter; its einsum dispatch (the same function as "sort") compiles
# faster. A dense-only kind would add no code path these two miss (and ~40 s of CI).
KINDS = {
    "topk rotary": {"attention": "topk", "attention_top_k": 3, "positions": "rotary"},
    "moe": {"ffn": "moe", "moe.n_experts": 4, "moe.top_k": 2, "moe.capacity_factor": 0.5,
            "moe.dispatch": "einsum"},
}


def make_run(**model) -> Run:
    cfg = tiny_config(model=model)
    tokenizer = pipeline.fit_tokenizer(cfg.tokenizer, pipeline.load_documents(cfg.data))
    cfg.model.vocab_size = tokenizer.vocab_size
    decoder = Decoder(cfg.model)
    return Run(cfg, init_params(decoder, 1), tokenizer, 0, decoder)


@pytest.fixture(scope="module", params=list(KINDS))
def run(request):
    return make_run(**KINDS[request.param])


def edited_sequences(tokenizer, seed=0) -> list[list[int]]:
    """Returns sequences the way the fuzzer makes them: a story's prefixes, with and without a one-token edit, each
    followed by candidate tails of one to three tokens, some longer than max_len (16), some repeated."""
    rng = np.random.default_rng(seed)
    story = [tokenizer.eos_id, *tokenizer.encode(stories_lib.generate_stories(1, 1000 + seed)[0].text)][:40]
    out = []
    for cut in (5, 17, 40):  # within one window, just past it, and over two windows
        for edit in (None, *rng.integers(1, cut, 2)):
            prompt = list(story[:cut])
            if edit is not None:
                prompt[edit] = int(rng.integers(3, tokenizer.vocab_size))
            out += [prompt + list(rng.integers(3, tokenizer.vocab_size, n)) for n in (1, 1, 2, 3)]
    return out + [out[0], story[:2]]


def test_prefix_forest_is_the_compressed_trie_of_the_inputs_against_brute_force():
    rng = np.random.default_rng(0)
    inputs = [tuple(rng.integers(0, 3, rng.integers(1, 7))) for _ in range(40)]
    forest = fuzz_scoring.prefix_forest(inputs)
    # Brute force: the nodes are the inputs and every non-empty common prefix of any two of them.
    expected = set(inputs) | {a[:fuzz_scoring.common_prefix_length(a, b)] for a, b in itertools.combinations(inputs, 2)}
    assert set(forest) == expected - {()}
    for node, parent in forest.items():
        proper = [p for p in forest if len(p) < len(node) and node[:len(p)] == p]
        assert parent == (max(proper, key=len) if proper else None)


def test_fit_calls_keeps_every_padded_call_inside_max_len_and_every_input_covered():
    rng = np.random.default_rng(1)
    inputs = [tuple(rng.integers(0, 2, rng.integers(1, 24))) for _ in range(30)]
    forest = fuzz_scoring.fit_calls(fuzz_scoring.prefix_forest(inputs), max_len=24)
    for node, parent in forest.items():
        start = 0 if parent is None else len(parent)
        assert parent is None or (start < len(node) and node[:start] == parent and parent in forest)
        assert start + fuzz_scoring.call_length(len(node) - start) <= 24
    assert set(inputs) <= set(forest)


def test_cache_after_a_padded_call_equals_the_cache_after_the_real_tokens_alone():
    run = make_run(**KINDS["moe"])
    model, params = run.model, run.params
    rng = np.random.default_rng(2)
    prefix = jnp.asarray(rng.integers(3, 50, (2, 5)), jnp.int32)
    tokens = jnp.asarray(rng.integers(3, 50, (2, 8)), jnp.int32)
    real = jnp.asarray([3, 8], jnp.int32)
    decode = jax.jit(lambda cache, x: model.apply({"params": params, "cache": cache}, x, decode=True, mutable=["cache"]))
    _, start = decode(init_cache(model, 2, 16), prefix)
    _, _, padded = fuzz_scoring.extend_prefixes(model, params, start["cache"], tokens, real)
    for row in range(2):  # reference: feed only the row's real tokens
        cache = jax.tree.map(lambda c: c[row:row + 1], start["cache"])
        _, alone = decode(cache, tokens[row:row + 1, :int(real[row])])
        assert int(padded["next_position"][row]) == int(alone["cache"]["next_position"][0]) == 5 + int(real[row])
        for block in range(run.config.model.n_layers):
            counts = padded[f"block_{block}"]["ffn"]["expert_counts"][row]
            np.testing.assert_array_equal(counts, alone["cache"][f"block_{block}"]["ffn"]["expert_counts"][0])


def test_shared_prefix_log_probs_equal_the_plain_forward_per_window(run):
    sequences = edited_sequences(run.tokenizer)
    assert max(map(len, sequences)) > 2 * run.config.model.max_len  # several windows
    assert fuzz_scoring.plain_path_reason(run) is None
    got = fuzz_scoring.shared_prefix_token_log_probs(run, sequences)
    reference = fuzz.plain_token_log_probs(run, sequences)
    for g, r in zip(got, reference):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)


def test_fuzzer_observations_equal_the_plain_jitted_path(run):
    """Probe scores (bits) and continuation surprisal through Targets.observe, against the same measures computed
    with evaluate.token_log_probs (the plain windowed path; the test above ties the log-probs to the unpadded
    per-window reference)."""
    stories = fuzz.held_out_stories([run], 12, 0)
    probe_list = [p for p in probes_lib.make_probes(stories, 4) if probes_lib.expressible(run.tokenizer, p)][:4]
    assert len(probe_list) >= 3
    targets = fuzz.Targets({"m": run}, stories)
    scores = targets.observe(fuzz.ORACLES["invariance"], ["m"], probe_list)
    assert targets.queries == len(probe_list)  # one query per (text, model), as before
    bits = targets.observe(fuzz.ORACLES["surprisal"], ["m"], probe_list)
    assert targets.queries == 2 * len(probe_list)
    plain_scores = probes_lib.score_probes(run, probe_list, log_probs=evaluate.token_log_probs)
    continuations = [fuzz.continuation_of(stories[p.story], p.prompt) for p in probe_list]
    plain_bits = fuzz.continuation_bits(run, [p.prompt for p in probe_list], continuations, evaluate.token_log_probs)
    for got, reference in zip(scores, plain_scores):
        np.testing.assert_allclose(got[0], reference["scores_bits"], atol=1e-4)
    np.testing.assert_allclose([b[0] for b in bits], plain_bits, atol=1e-5)


def test_kinds_without_a_kv_cache_form_use_the_plain_path():
    no_ffn = make_run(ffn="none")
    texts = ["Once upon a time there was a dog", "Once upon a time there was a cat"]
    tokenizer = no_ffn.tokenizer
    bigram = bigram_run(tokenizer, bigram_logits(tokenizer, pipeline.load_documents(no_ffn.config.data)[:50]))
    for run in (no_ffn, bigram):
        assert fuzz_scoring.plain_path_reason(run) is not None
        sequences = [[tokenizer.eos_id, *ids] for ids in tokenizer.encode_batch(texts)]
        for g, r in zip(fuzz_scoring.shared_prefix_token_log_probs(run, sequences),
                        evaluate.token_log_probs(run, sequences)):
            np.testing.assert_array_equal(g, r)
