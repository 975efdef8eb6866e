"""KV-cache decoding: cache attention against float64 numpy and the full forward; cached logits and samples against
the full-rerun reference on dense, top-k, rotary, dropless MoE, MoE with capacity (dropping tokens) and grammar-state models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyjax import grammar as G
from toyjax.config import ModelConfig, MoEConfig
from toyjax.models.attention import attend_to_cache, dense_attention
from toyjax.models.decoder import Decoder
from toyjax.models.kv_cache import init_cache
from toyjax.models.topk_attention import topk_attend_to_cache, topk_attention
from toyjax.sample import sample

# -- the pure cache attention -------------------------------------------------------------------------------------


def numpy_cache_attention(q, k, v, positions, top_k=None):
    """float64 reference: query (b, i) at positions[b, i] attends to keys 0..p of row b (only its top_k if given)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    kept = {}
    for b in range(q.shape[0]):
        for i, p in enumerate(positions[b]):
            for h in range(q.shape[2]):
                scores = k[b, :p + 1, h] @ q[b, i, h] / np.sqrt(q.shape[-1])
                keep = np.argsort(-scores, kind="stable")[:top_k] if top_k else np.arange(p + 1)
                weights = np.exp(scores[keep] - scores[keep].max())
                out[b, i, h] = (weights / weights.sum()) @ v[b, keep, h]
                kept[b, i, h] = set(keep.tolist())
    return out, kept


def random_qkv(batch=3, length=10, heads=2, head_dim=8, seed=0):
    q, k, v = jax.random.normal(jax.random.key(seed), (3, batch, length, heads, head_dim))
    return q, k, v


@pytest.mark.parametrize("top_k", [None, 1, 3, 20])
def test_cache_attention_matches_float64_numpy_and_the_full_forward_row(top_k):
    q, k, v = random_qkv()
    positions = np.array([[0, 4], [9, 2], [5, 6]])  # per row, two queries each, unordered
    q_at = jnp.stack([q[b, positions[b]] for b in range(3)])
    # Slots past a query's position hold keys of later tokens: the cache attention must ignore them.
    if top_k is None:
        got = attend_to_cache(q_at, k, v, jnp.asarray(positions))
        full = dense_attention(q, k, v, causal=True)
    else:
        got, indices, _ = topk_attend_to_cache(q_at, k, v, jnp.asarray(positions), top_k=top_k)
        full = topk_attention(q, k, v, top_k=top_k, causal=True)
    expected, kept = numpy_cache_attention(q_at, k, v, positions, top_k)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    full_rows = jnp.stack([full[b, positions[b]] for b in range(3)])
    np.testing.assert_allclose(got, full_rows, atol=1e-6)
    if top_k is not None:
        for (b, i, h), keys in kept.items():  # top_k is clipped to the 10 cache slots
            row = np.asarray(indices[b, i, h]).tolist()
            assert set(row) - {-1} == keys and row.count(-1) == min(top_k, 10) - len(keys), (b, i, h, row)


def test_topk_cache_attention_on_a_chunked_full_forward():
    q, k, v = random_qkv(batch=2, length=24, seed=1)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    full = topk_attention(q, k, v, top_k=5, causal=True, query_chunk=4)  # streamed over key blocks
    got, _, _ = topk_attend_to_cache(q, k, v, positions, top_k=5)
    np.testing.assert_allclose(got, full, atol=1e-6)


# -- the decoder in decode mode -----------------------------------------------------------------------------------

VOCAB = ["<pad>", "<unk>", "<eos>"] + "calc let in if then else = < > + - * ( ) ;".split() + \
    [str(i) for i in range(10)] + list("xyznm") + ["the", "cat"]
GRAMMAR = G.compile_grammar(G.load_default_grammar(), {w: i for i, w in enumerate(VOCAB)}, free_text=False)
TINY = ModelConfig(vocab_size=len(VOCAB), d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=14)
MODELS = {
    "dense": TINY,
    "topk": dataclasses.replace(TINY, attention="topk", attention_top_k=3),
    "rotary_topk": dataclasses.replace(TINY, positions="rotary", attention="topk", attention_top_k=4),
    "rotary": dataclasses.replace(TINY, positions="rotary"),
    # The einsum dispatch computes the same function as "sort" (tests/test_moe.py) and compiles about twice as fast.
    "moe_dropless": dataclasses.replace(TINY, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=0.0,
                                                                        dispatch="einsum")),
    # Capacity 4 of 14 positions x 2 choices over 4 experts: tokens are dropped, so decoding must carry each row's
    # expert counts to match the full forward (the causal capacity rule of toyjax/models/moe.py).
    "moe_capacity": dataclasses.replace(TINY, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=0.5,
                                                                        dispatch="einsum")),
    "grammar_state": dataclasses.replace(TINY, grammar_state_embedding=True, grammar_feature_sizes=GRAMMAR.feature_sizes),
}


def build(name, seed=0):
    model = Decoder(MODELS[name])
    features = None
    if model.cfg.grammar_state_embedding:
        features = jnp.zeros((1, model.cfg.max_len, len(GRAMMAR.feature_sizes)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, model.cfg.max_len), jnp.int32), state_features=features)
    # Sharpen the random init's attention (scores x16) so that it is far from uniform and top-k selection matters.
    sharpen = lambda path, p: p * 4.0 if "qkv" in jax.tree_util.keystr(path) else p  # noqa: E731
    return model, jax.tree_util.tree_map_with_path(sharpen, params["params"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_logits_equal_the_full_forward_for_rows_at_different_positions(name):
    model, params = build(name)
    batch, length = 2, model.cfg.max_len
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 3, len(VOCAB))
    states = jax.random.randint(jax.random.key(2), (batch, length), 0, GRAMMAR.features.shape[0])
    features = GRAMMAR.features[states] if model.cfg.grammar_state_embedding else None
    full_logits = jax.jit(model.apply)({"params": params}, tokens, state_features=features)

    @jax.jit
    def prefill(cache):  # the first 3 tokens of every row in one call
        prompt_features = None if features is None else features[:, :3]
        logits, updated = model.apply({"params": params, "cache": cache}, tokens[:, :3], state_features=prompt_features,
                                      decode=True, mutable=["cache"])
        return logits, updated["cache"]

    @jax.jit
    def step(cache, positions):  # the token at positions[b] of each row b
        rows = jnp.arange(batch)
        step_features = None if features is None else features[rows, positions][:, None]
        logits, updated = model.apply({"params": params, "cache": cache}, tokens[rows, positions][:, None],
                                      state_features=step_features, decode=True, mutable=["cache"])
        return logits[:, 0], updated["cache"]

    def expect_full_logits(logits, positions):
        np.testing.assert_allclose(logits, full_logits[jnp.arange(batch), positions], atol=1e-5, rtol=0)

    prefill_logits, cache = prefill(init_cache(model, batch, length))
    np.testing.assert_allclose(prefill_logits, full_logits[:, :3], atol=1e-5, rtol=0)
    # Row 1 runs two tokens ahead of row 0: both then decode in one batch at different positions.
    ahead = cache
    for position in (3, 4):
        logits, ahead = step(ahead, jnp.array([position, position]))
        expect_full_logits(logits, [position, position])
    cache = jax.tree.map(lambda behind, ahead: jnp.concatenate([behind[:1], ahead[1:]]), cache, ahead)
    np.testing.assert_array_equal(cache["next_position"], [3, 5])
    for offset in range(length - 5):
        positions = jnp.array([3 + offset, 5 + offset])
        logits, cache = step(cache, positions)
        expect_full_logits(logits, positions)


# -- the two samplers ---------------------------------------------------------------------------------------------

PROMPTS = [[2, 5, 7], [2], [2, 9, 9, 4, 3, 11], [2, 6]]


@pytest.mark.parametrize("name", ["dense", "topk", "rotary_topk", "moe_dropless", "moe_capacity"])
def test_greedy_samples_of_both_methods_are_identical_with_prompts_of_different_lengths(name):
    model, params = build(name)
    cached = np.asarray(sample(model, params, PROMPTS, greedy=True, method="cache"))
    rerun = np.asarray(sample(model, params, PROMPTS, greedy=True, method="rerun"))
    np.testing.assert_array_equal(cached, rerun)
    for row, prompt in enumerate(PROMPTS):
        assert cached[row, :len(prompt)].tolist() == prompt
    # Independent of batching: each row equals its prompt sampled alone by the reference.
    alone = np.asarray(sample(model, params, PROMPTS[2], n=len(PROMPTS), greedy=True, method="rerun"))  # same shape
    np.testing.assert_array_equal(cached[2], alone[0])
    assert len({tuple(row[6:]) for row in cached.tolist()}) > 1  # the model does not emit one fixed string


def test_temperature_samples_of_both_methods_are_identical_for_the_same_key():
    model, params = build("topk")
    options = dict(key=jax.random.key(7), temperature=1.5, top_p=0.95)
    cached = np.asarray(sample(model, params, PROMPTS, method="cache", **options))
    np.testing.assert_array_equal(cached, np.asarray(sample(model, params, PROMPTS, method="rerun", **options)))
    greedy = np.asarray(sample(model, params, PROMPTS, greedy=True, method="cache"))
    assert not np.array_equal(cached, greedy)  # the draws were random, not argmax


def test_grammar_constrained_samples_of_both_methods_are_identical_and_parse():
    model, params = build("grammar_state")
    options = dict(n=6, key=jax.random.key(3), temperature=1.0, grammar=GRAMMAR)
    cached = np.asarray(sample(model, params, [2], method="cache", **options))
    np.testing.assert_array_equal(cached, np.asarray(sample(model, params, [2], method="rerun", **options)))
    for row in cached.tolist():
        G.annotate(GRAMMAR, row[1:])  # raises GrammarError on a token the grammar does not allow


def test_method_choice_and_clear_errors():
    model, params = build("dense")
    with pytest.raises(ValueError, match="'cache' or 'rerun'"):
        sample(model, params, [2], method="fast")
    with pytest.raises(ValueError, match="2 prompts .* n=3"):
        sample(model, params, [[2], [2, 3]], n=3)
    odd = Decoder(dataclasses.replace(MODELS["dense"], ffn="no_such_ffn"))
    with pytest.raises(ValueError, match="no_such_ffn.*method='rerun'"):
        sample(odd, None, [2], method="cache")


def test_the_capacity_moe_model_really_drops_tokens():
    """Without drops, moe_capacity would not test that decoding carries each row's expert counts."""
    model, params = build("moe_capacity")
    tokens = jax.random.randint(jax.random.key(1), (2, model.cfg.max_len), 3, len(VOCAB))
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    leaves = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    gates = [np.asarray(g) for path, g in leaves if "expert_gate" in jax.tree_util.keystr(path)]
    assert len(gates) == model.cfg.n_layers
    assert np.mean([(g == 0).mean() for g in gates]) > 0.1
