import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from toyjax.models.topk_attention import _topk_attention_autodiff, block_prefiltered_top_k, topk_attention


def numpy_topk_attention(q, k, v, top_k, causal):
    """Float64 brute force: per query, sort the visible scores, keep the top ones, softmax, weighted sum."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, head_dim = q.shape
    out = np.zeros_like(q)
    kept = np.full((batch, length, heads, top_k), -1)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                visible = np.arange(i + 1 if causal else k.shape[1])
                scores = k[b, visible, h] @ q[b, i, h] / np.sqrt(head_dim)
                order = np.argsort(-scores)[:top_k]
                weights = np.exp(scores[order] - scores[order].max())
                weights /= weights.sum()
                out[b, i, h] = weights @ v[b, visible[order], h]
                kept[b, i, h, : len(order)] = visible[order]
    return out, kept


def numpy_dense_attention(q, k, v, causal):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


def random_qkv(seed, batch=2, length=13, heads=3, head_dim=8, dtype=jnp.float32):
    return tuple(jax.random.normal(key, (batch, length, heads, head_dim), dtype) for key in jax.random.split(jax.random.key(seed), 3))


# query_chunk=3 at length 13 streams keys in blocks of 12, so the running top-k merge is exercised too.
@pytest.mark.parametrize("query_chunk", [None, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_top_k_at_least_length_is_dense_attention(causal, query_chunk):
    q, k, v = random_qkv(0)
    out = topk_attention(q, k, v, top_k=13, causal=causal, query_chunk=query_chunk)
    np.testing.assert_allclose(out, numpy_dense_attention(q, k, v, causal), atol=1e-5)
    bigger = topk_attention(q, k, v, top_k=50, causal=causal, query_chunk=query_chunk)
    np.testing.assert_allclose(bigger, numpy_dense_attention(q, k, v, causal), atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_top_1_is_hard_attention_on_the_arg_max_key(causal):
    q, k, v = random_qkv(1)
    scores = np.einsum("bqhd,bkhd->bqhk", np.asarray(q, np.float64), np.asarray(k, np.float64))
    if causal:
        scores = np.where(np.tril(np.ones((13, 13), bool))[None, :, None, :], scores, -np.inf)
    arg_max = scores.argmax(-1)  # [batch, length, heads]
    batch_index, head_index = np.arange(2)[:, None, None], np.arange(3)[None, None, :]
    expected = np.asarray(v)[batch_index, arg_max, head_index]  # v[b, arg_max[b, i, h], h]: [b, L, h, d]
    for query_chunk in (None, 2):
        out, indices, weights = topk_attention(q, k, v, top_k=1, causal=causal, query_chunk=query_chunk, return_indices=True)
        np.testing.assert_array_equal(indices[..., 0], arg_max)
        np.testing.assert_allclose(weights, 1.0)
        np.testing.assert_allclose(out, expected, atol=1e-6)
    # One kept key has softmax weight 1 whatever its score: q and k get exactly zero gradient, v gets all of it.
    grads = jax.jit(jax.grad(lambda *x: jnp.sum(topk_attention(*x, top_k=1, causal=causal) ** 2), argnums=(0, 1, 2)))(q, k, v)
    assert not np.asarray(grads[0]).any() and not np.asarray(grads[1]).any() and np.asarray(grads[2]).any()


@pytest.mark.parametrize("query_chunk", [None, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_brute_force_including_first_positions(causal, query_chunk):
    # Positions 0..4 see fewer than top_k=6 keys: they must be exact, NaN-free, with -1 / weight 0 in spare slots.
    q, k, v = random_qkv(2, length=23)
    out, indices, weights = topk_attention(q, k, v, top_k=6, causal=causal, query_chunk=query_chunk, return_indices=True)
    expected, expected_indices = numpy_topk_attention(q, k, v, 6, causal)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_array_equal(np.sort(indices, -1), np.sort(expected_indices, -1))
    np.testing.assert_array_equal(np.asarray(weights) == 0, expected_indices == -1)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("query_chunk", [None, 2, 5])
def test_no_future_key_is_ever_selected(query_chunk):
    q, k, v = random_qkv(3, length=20)
    # Make later keys score far higher, so an unmasked selection would reach into the future.
    k = k + 3.0 * jnp.arange(20.0)[None, :, None, None] * q.mean(axis=1, keepdims=True)
    out, indices, weights = topk_attention(q, k, v, top_k=5, query_chunk=query_chunk, return_indices=True)
    positions = np.arange(20)[None, :, None, None]
    assert (np.asarray(indices) <= positions).all()
    filled = np.asarray(indices) >= 0
    np.testing.assert_array_equal(filled.sum(-1), np.minimum(positions[..., 0] + 1, 5) + 0 * filled[..., 0])
    assert (np.asarray(weights)[~filled] == 0).all()
    expected, _ = numpy_topk_attention(q, k, v, 5, causal=True)
    np.testing.assert_allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_equals_unchunked_values_and_gradients(causal):
    q, k, v = random_qkv(4, length=37)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def loss(q, k, v, chunk):
        out, _, weights = topk_attention(q, k, v, top_k=5, causal=causal, query_chunk=chunk, return_indices=True)
        return jnp.sum(out * cotangent) + jnp.sum(weights**2)

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    whole = value_and_grads(q, k, v, None)
    for chunk in (4, 5):  # key blocks of 16 and 20 (so 37 is padded to 40), a running top-k over 3 and 2 blocks
        chunked = value_and_grads(q, k, v, chunk)
        np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5)
        for a, b in zip(chunked[1], whole[1]):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("query_chunk", [None, 2])
def test_gradients_match_finite_differences_in_float64(query_chunk):
    with jax.enable_x64(True):
        q, k, v = random_qkv(5, batch=1, length=9, heads=2, head_dim=4, dtype=jnp.float64)

        def loss(q, k, v):  # uses the returned weights too, so their cotangent path is checked
            out, _, weights = topk_attention(q, k, v, top_k=3, query_chunk=query_chunk, return_indices=True)
            return jnp.sum(jnp.sin(out)) + jnp.sum(weights * jnp.arange(3.0))

        check_grads(jax.jit(loss), (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_equal_dense_gradients_when_top_k_covers_every_key(causal):
    q, k, v = random_qkv(6, length=11)
    cotangent = jax.random.normal(jax.random.key(7), q.shape)

    def dense(q, k, v):  # written here, independent of toyjax
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1] * 1.0)
        if causal:
            scores = jnp.where(jnp.tril(jnp.ones((11, 11), bool)), scores, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)

    expected = jax.grad(lambda *x: jnp.sum(dense(*x) * cotangent), argnums=(0, 1, 2))(q, k, v)
    for chunk in (None, 2):
        grads = jax.jit(jax.grad(
            lambda *x: jnp.sum(topk_attention(*x, top_k=11, causal=causal, query_chunk=chunk) * cotangent),
            argnums=(0, 1, 2),
        ))(q, k, v)
        for a, b in zip(grads, expected):
            np.testing.assert_allclose(a, b, atol=2e-5)


def test_custom_backward_equals_autodiff_through_top_k():
    q, k, v = random_qkv(8, length=17)
    cotangent = jax.random.normal(jax.random.key(3), q.shape)
    custom = jax.jit(jax.grad(lambda *x: jnp.sum(topk_attention(*x, top_k=4, query_chunk=4) * cotangent), argnums=(0, 1, 2)))
    plain = jax.jit(jax.grad(
        lambda *x: jnp.sum(_topk_attention_autodiff(*x, top_k=4, query_chunk=4) * cotangent), argnums=(0, 1, 2)
    ))
    for a, b in zip(custom(q, k, v), plain(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_approx_option_and_bfloat16_run_cleanly():
    q, k, v = random_qkv(10, length=16)
    out, indices, _ = topk_attention(q, k, v, top_k=4, approx=True, query_chunk=4, return_indices=True)
    assert np.isfinite(np.asarray(out)).all() and (np.asarray(indices) <= np.arange(16)[None, :, None, None]).all()
    half = topk_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), top_k=16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), numpy_dense_attention(q, k, v, True), atol=0.05)


def numpy_top_k(scores, top_k):
    """Brute force: per row, a stable sort by descending score (ties: the lower index first, as lax.top_k)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :top_k]
    return np.take_along_axis(scores, order, axis=-1), order


@pytest.mark.parametrize(
    "length, top_k, block_size",
    [(40, 3, 4), (64, 5, 8), (100, 7, 3), (130, 4, 16), (257, 8, 16), (33, 2, 32)],
)
def test_block_prefiltered_top_k_equals_brute_force_with_ties_and_masked_rows(length, top_k, block_size):
    rng = np.random.default_rng(length + top_k)
    rows = 2 * length
    # Scores on a coarse grid (many exact ties, also across blocks), then causally masked like attention rows:
    # row r sees keys <= r - length, so the first rows see nothing (all -inf) and many see fewer than top_k keys.
    scores = rng.integers(-4, 5, size=(3, rows, length)).astype(np.float32)
    visible = np.arange(length)[None, :] <= np.arange(rows)[:, None] - length
    scores = np.where(visible, scores, -np.inf)
    scores[0, -1] = 2.0  # one row of nothing but ties
    values, indices = block_prefiltered_top_k(jnp.asarray(scores), top_k, block_size=block_size)
    expected_values, expected_indices = numpy_top_k(scores, top_k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(indices, jax.lax.top_k(jnp.asarray(scores), top_k)[1])


@pytest.mark.parametrize("query_chunk", [None, 8])
def test_long_rows_use_the_pre_filter_and_match_brute_force(query_chunk):
    # L=160, k=3: 10 selection blocks of 16 keys > k, so the block-maxima path runs (chunk 8 streams key blocks
    # of 32 into the score buffer); early queries see fewer than 3 keys.
    q, k, v = random_qkv(11, batch=1, length=160, heads=2, head_dim=8)
    out, indices, weights = topk_attention(q, k, v, top_k=3, query_chunk=query_chunk, return_indices=True)
    expected, expected_indices = numpy_topk_attention(q, k, v, 3, causal=True)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_array_equal(indices, expected_indices)  # same keys, in the same (descending) order
    np.testing.assert_array_equal(np.asarray(weights) == 0, expected_indices == -1)


def test_bad_inputs_name_the_problem():
    q, k, v = random_qkv(0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        topk_attention(q, k, v, top_k=0)
    with pytest.raises(ValueError, match="query_chunk"):
        topk_attention(q, k, v, top_k=2, query_chunk=0)
    with pytest.raises(ValueError, match=r"q must be \[batch, length, heads, head_dim\]"):
        topk_attention(q[0], k, v, top_k=2)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        topk_attention(q, k, v[:, :5], top_k=2)


def test_topk_decoder_trains_end_to_end_and_sows_its_choices(tmp_path):
    import json

    from toyjax import load_run, train
    from toyjax.testing import tiny_config

    cfg = tiny_config(
        model={"attention": "topk", "attention_top_k": 2, "attention_query_chunk": 4},
        train={"steps": 40, "batch_size": 8, "learning_rate": 1e-2, "log_every": 5, "eval_every": 40,
               "checkpoint_every": 40},
    )
    result = train.run(cfg, tmp_path, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    # 40 steps take the uniform guess (log 120 = 4.8 nats) to about 4.1: the loss must clearly fall.
    assert np.isfinite(result["loss"]) and train_losses[-1] < train_losses[0] - 0.4
    assert result["loss"] < np.log(cfg.tokenizer.vocab_size) - 0.4

    run = load_run(tmp_path)
    tokens = jnp.asarray(run.tokenizer.encode("once upon a time there was a little girl")[:16])[None]
    _, state = run.model.apply({"params": run.params}, tokens, mutable=["intermediates"])
    (indices,) = state["intermediates"]["block_0"]["attention"]["topk_indices"]
    (weights,) = state["intermediates"]["block_0"]["attention"]["topk_weights"]
    assert indices.shape == (1, tokens.shape[1], 2, 2) and weights.shape == indices.shape
    assert (np.asarray(indices) <= np.arange(tokens.shape[1])[None, :, None, None]).all()
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
