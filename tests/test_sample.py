import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyjax.config import ModelConfig
from toyjax.models.decoder import Decoder
from toyjax.sample import cut_at_eos, filter_logits, sample


@pytest.fixture(scope="module")
def model_and_params():
    model = Decoder(ModelConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=12))
    return model, model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]


def test_greedy_equals_a_step_by_step_argmax(model_and_params):
    model, params = model_and_params
    prompt = [2, 5, 7]
    tokens = np.asarray(sample(model, params, prompt, n=2, length=10, greedy=True))
    expected = list(prompt)
    while len(expected) < 10:  # independent reference: re-run the model on the growing prefix
        logits = model.apply({"params": params}, jnp.asarray([expected]))
        expected.append(int(np.argmax(logits[0, -1])))
    assert tokens.tolist() == [expected, expected]


def test_same_key_same_samples_and_prompt_kept(model_and_params):
    model, params = model_and_params
    a = sample(model, params, [1, 2], n=3, length=12, key=jax.random.key(4), temperature=1.0)
    b = sample(model, params, [1, 2], n=3, length=12, key=jax.random.key(4), temperature=1.0)
    c = sample(model, params, [1, 2], n=3, length=12, key=jax.random.key(5), temperature=1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (np.asarray(a)[:, :2] == [1, 2]).all()


def test_top_k_and_top_p_filters_match_numpy():
    logits = np.random.default_rng(0).normal(size=(4, 30)).astype(np.float32)
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=5)))
    np.testing.assert_array_equal(kept, logits >= np.sort(logits, -1)[:, -5:-4])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row in range(4):
        order = np.argsort(-probs[row])
        mass_before = np.concatenate([[0], np.cumsum(probs[row, order])[:-1]])
        expected = set(order[mass_before < 0.7].tolist())
        got = set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits[row:row + 1], top_p=0.7))[0])).tolist())
        assert got == expected


def test_sampled_tokens_respect_top_k(model_and_params):
    model, params = model_and_params
    tokens = np.asarray(sample(model, params, [3], n=8, length=4, top_k=1, key=jax.random.key(1)))
    greedy = np.asarray(sample(model, params, [3], n=8, length=4, greedy=True))
    np.testing.assert_array_equal(tokens, greedy)


def test_cut_at_eos_and_bad_lengths(model_and_params):
    model, params = model_and_params
    assert cut_at_eos(np.array([[0, 4, 5, 0, 6], [0, 1, 2, 3, 4]]), 0, skip=1) == [[4, 5], [1, 2, 3, 4]]
    with pytest.raises(ValueError, match="length=40 must be more than the prompt's 1 tokens and at most model.max_len=12"):
        sample(model, params, [1], length=40)
    with pytest.raises(ValueError, match="non-empty prompt"):
        sample(model, params, [])
