import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from toyjax.config import ModelConfig
from toyjax.models.attention import apply_rotary, dense_attention
from toyjax.models.decoder import Decoder


def numpy_attention(q, k, v, causal):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_attention_matches_float64_numpy(causal):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 7, 3, 8))
    np.testing.assert_allclose(dense_attention(q, k, v, causal=causal), numpy_attention(q, k, v, causal), atol=1e-5)


def test_rotary_scores_depend_only_on_offset():
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 16))
    def score(i, j):
        qi = apply_rotary(q, jnp.full((1, 1), i))
        kj = apply_rotary(k, jnp.full((1, 1), j))
        return float(jnp.sum(qi * kj))
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rotary(q, jnp.full((1, 1), 7))), jnp.linalg.norm(q), rtol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_future_tokens_do_not_change_earlier_logits(positions):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=12, positions=positions)
    model = Decoder(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 50)
    params = model.init(jax.random.key(1), tokens)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 50)
    a, b = model.apply(params, tokens), model.apply(params, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


def test_untied_and_bfloat16_variants_run_and_agree_roughly():
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 40)
    base = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=8)
    params = Decoder(base).init(jax.random.key(1), tokens)
    full = Decoder(base).apply(params, tokens)
    half = Decoder(ModelConfig(**{**base.__dict__, "dtype": "bfloat16"})).apply(params, tokens)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(full, half, atol=0.1)
    untied = Decoder(ModelConfig(**{**base.__dict__, "tie_embeddings": False}))
    assert "unembed" in untied.init(jax.random.key(1), tokens)["params"]


def test_bad_model_configs_are_clear():
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="not divisible"):
        Decoder(ModelConfig(vocab_size=10, d_model=30, n_heads=4, max_len=8)).init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="unknown model.attention 'sparse'"):
        Decoder(ModelConfig(vocab_size=10, attention="sparse", max_len=8)).init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="exceeds model.max_len"):
        Decoder(ModelConfig(vocab_size=10, max_len=4)).init(jax.random.key(0), tokens)


def test_tiny_model_overfits_a_fixed_batch():
    cfg = ModelConfig(vocab_size=30, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=16)
    model = Decoder(cfg)
    tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 30)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = model.init(jax.random.key(1), inputs)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, inputs), targets).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for _ in range(300):
        params, opt_state, loss = step(params, opt_state)
        first = first if first is not None else float(loss)
    assert first > 3.0 and float(loss) < 0.05
