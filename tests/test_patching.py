"""Activation patching: vectorised runs against one hooked full forward pass per index."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyjax import interp
from toyjax.config import ModelConfig
from toyjax.models.decoder import Decoder


@pytest.fixture(scope="module")
def pair():
    """A tiny decoder and a clean / corrupted pair that differ at positions 1 and 3."""
    cfg = ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=8)
    decoder = Decoder(cfg)
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.integers(0, 20, (2, 5)), jnp.int32)
    corrupted = clean.at[:, 1].set((clean[:, 1] + 5) % 20).at[:, 3].set((clean[:, 3] + 7) % 20)
    params = jax.jit(decoder.init)(jax.random.key(1), clean)["params"]
    params = jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), params)
    return (decoder, params), clean, corrupted


def naive_patching(run, clean_tokens, corrupted_tokens, metric, activation, index):
    """The one-run-per-index loop: a full hooked forward pass for every layer and index."""
    names = [f"blocks.{i}.{activation}" for i in range(2)]
    _, clean = interp.run_with_cache(run, clean_tokens, names)
    n_pos, n_heads = clean[names[0]].shape[1], 2
    slots = {"position": [(p,) for p in range(n_pos)], "head": [(slice(None), h) for h in range(n_heads)],
             "position_head": [(p, h) for p in range(n_pos) for h in range(n_heads)]}[index]
    out = np.zeros((2, len(slots)))
    for layer, name in enumerate(names):
        for j, slot in enumerate(slots):
            where = (slice(None),) + slot
            hook = {name: lambda x, where=where, value=clean[name]: x.at[where].set(value[where])}
            out[layer, j] = float(metric(interp.run_with_hooks(run, corrupted_tokens, hook)))
    return out.reshape(2, n_pos, n_heads) if index == "position_head" else out


@pytest.mark.parametrize("activation,index", [("hook_resid_pre", "position"), ("hook_mlp_out", "position"),
                                              ("attn.hook_z", "head"), ("attn.hook_z", "position_head")])
def test_vectorised_patching_equals_the_naive_loop(pair, activation, index):
    run, clean, corrupted = pair
    metric = interp.logit_difference([2, 5], [7, 9])
    result = interp.patch_activation(run, clean, corrupted, metric, activation, index=index)
    want = naive_patching(run, clean, corrupted, metric, activation, index)
    np.testing.assert_allclose(result.patched, want, atol=1e-5)
    assert np.abs(want).max() > 1e-3 and np.ptp(want) > 1e-3  # the patches do change the metric
    clean_metric = float(metric(interp.run_with_hooks(run, clean, {})))
    corrupted_metric = float(metric(interp.run_with_hooks(run, corrupted, {})))
    np.testing.assert_allclose(result.recovered, (want - corrupted_metric) / (clean_metric - corrupted_metric),
                               atol=1e-4, rtol=1e-4)


def test_batched_map_equals_vmap(pair):
    run, clean, corrupted = pair
    metric = interp.logit_difference([2, 5], [7, 9], position=2)
    whole = interp.patch_activation(run, clean, corrupted, metric, batch_size=None)
    batched = interp.patch_activation(run, clean, corrupted, metric, batch_size=2)
    np.testing.assert_allclose(batched.patched, whole.patched, atol=1e-6)
    # Nothing differs before position 1, and a causal model cannot see later positions from position 2.
    np.testing.assert_allclose(whole.patched[:, [0, 3, 4]], whole.corrupted, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 1])
def test_patching_the_whole_clean_residual_restores_the_clean_logits_and_nothing_keeps_the_corrupted(pair, layer):
    run, clean, corrupted = pair
    name = f"blocks.{layer}.hook_resid_pre"
    clean_logits, clean_cache = interp.run_with_cache(run, clean, [name])
    corrupted_logits, corrupted_cache = interp.run_with_cache(run, corrupted, [name])
    edits = [lambda x, i: clean_cache[name], lambda x, i: x]  # everything, nothing
    for edit, want in zip(edits, (clean_logits, corrupted_logits)):
        logits = jax.jit(lambda resid, edit=edit: interp.run_patched(
            run, corrupted, resid, layer, name, edit, jnp.arange(3), lambda logits: logits))(corrupted_cache[name])
        assert logits.shape == (3,) + want.shape
        np.testing.assert_allclose(logits, jnp.broadcast_to(want, logits.shape), atol=1e-5)
    assert np.abs(np.asarray(clean_logits - corrupted_logits)).max() > 1e-2


def test_bad_patching_requests_are_clear(pair, tmp_path):
    run, clean, corrupted = pair
    metric = interp.logit_difference([2, 5], [7, 9])
    with pytest.raises(ValueError, match="index must be one of position, head, position_head"):
        interp.patch_activation(run, clean, corrupted, metric, index="layer")
    with pytest.raises(ValueError, match="needs a per-head activation"):
        interp.patch_activation(run, clean, corrupted, metric, "hook_resid_pre", index="head")
    with pytest.raises(ValueError, match="must have the same shape"):
        interp.patch_activation(run, clean, corrupted[:, :4], metric)
    with pytest.raises(interp.HookNameError, match="did you mean 'blocks.0.hook_mlp_out'"):
        interp.patch_activation(run, clean, corrupted, metric, "hook_mlp_outt")
    with pytest.raises(ValueError, match="2-D or 3-D"):
        interp.plot_patching(np.zeros(3), tmp_path / "x.png")
    path = interp.plot_patching(np.arange(6.0).reshape(2, 3), tmp_path / "heat.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
