"""Activation patching: vectorised runs against one hooked full forward pass per index."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyjax import interp
from toyjax.config import ModelConfig, MoEConfig
from toyjax.interp import suffix_patching
from toyjax.models.decoder import Decoder


TINY = ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=8)
MODELS = {
    "dense": TINY,
    "rotary_topk": dataclasses.replace(TINY, positions="rotary", attention="topk", attention_top_k=2),
    # Capacity 2 per expert for 5 positions x 2 choices over 4 experts: tokens are dropped, so a suffix run must
    # start from the corrupted prefix's expert counts.
    "moe_capacity": dataclasses.replace(TINY, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=0.5,
                                                                        dispatch="einsum")),
}


def make_pair(cfg):
    """A decoder with perturbed random weights and a clean / corrupted pair that differ at positions 1 and 3."""
    decoder = Decoder(cfg)
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.integers(0, 20, (2, 5)), jnp.int32)
    corrupted = clean.at[:, 1].set((clean[:, 1] + 5) % 20).at[:, 3].set((clean[:, 3] + 7) % 20)
    params = jax.jit(decoder.init)(jax.random.key(1), clean)["params"]
    params = jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), params)
    return (decoder, params), clean, corrupted


@pytest.fixture(scope="module")
def pair():
    return make_pair(TINY)


def naive_patching(run, clean_tokens, corrupted_tokens, metric, activation, index):
    """The one-run-per-index loop: a full hooked forward pass for every layer and index (jitted per layer)."""
    names = [f"blocks.{i}.{activation}" for i in range(2)]
    _, clean = interp.run_with_cache(run, clean_tokens, names)
    n_pos, n_heads = clean[names[0]].shape[1], 2
    slots = {"position": [(p,) for p in range(n_pos)], "head": [(h,) for h in range(n_heads)],
             "position_head": [(p, h) for p in range(n_pos) for h in range(n_heads)]}[index]
    out = np.zeros((2, len(slots)))
    for layer, name in enumerate(names):
        def where(slot):
            return (slice(None), slice(None), slot[0]) if index == "head" else (slice(None),) + slot

        @jax.jit
        def one(slot, value=clean[name]):
            hook = {name: lambda x: x.at[where(slot)].set(value[where(slot)])}
            return metric(interp.run_with_hooks(run, corrupted_tokens, hook))

        for j, slot in enumerate(slots):
            out[layer, j] = float(one(tuple(jnp.int32(i) for i in slot)))
    return out.reshape(2, n_pos, n_heads) if index == "position_head" else out


def every_position_metric(logits):
    """A metric that reads the logits at every position (no reads_position): the suffix runs compute them all."""
    return jnp.sum(jnp.arange(1.0, logits.shape[1] + 1) * jnp.mean(logits[:, :, 2] - logits[:, :, 7], axis=0))


@pytest.mark.parametrize("model,activation,index,reads_one_position", [
    ("dense", "hook_resid_pre", "position", True), ("dense", "hook_attn_out", "position", False),
    ("rotary_topk", "attn.hook_z", "position", True), ("rotary_topk", "hook_resid_pre", "position", False),
    ("moe_capacity", "attn.hook_z", "position_head", False)])  # one MoE case: its decode path compiles slowly
def test_suffix_patching_equals_the_naive_loop(model, activation, index, reads_one_position):
    """Runs over suffixes from the corrupted KV-cache state, in uneven chunks (2, 2, 1 of 5 positions), for a
    metric that reads one position (the last layer runs there alone) or one that reads them all."""
    run, clean, corrupted = make_pair(MODELS[model])
    assert suffix_patching.causal_suffix_patching_applies(MODELS[model], activation)
    metric = interp.logit_difference([2, 5], [7, 9]) if reads_one_position else every_position_metric
    result = interp.patch_activation(run, clean, corrupted, metric, activation, index=index, chunk_size=2,
                                     batch_size=3)
    want = naive_patching(run, clean, corrupted, metric, activation, index)
    np.testing.assert_allclose(result.patched, want, atol=2e-5, rtol=1e-5)
    assert np.ptp(want) > 1e-3  # the patches do change the metric


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_patching_of_a_shared_prefix_equals_the_naive_loop(chunk_size):
    """Prompts that differ only at position 2: positions 0-1 (every layer) and 3-4 of layer 0's residual are
    patched with values equal to the corrupted ones, so whole batches / chunks of them are skipped (plain path:
    batches of 2 positions; suffix path: chunks of 2); all must equal the loop."""
    run, clean, _ = make_pair(TINY)
    corrupted = clean.at[:, 2].set((clean[:, 2] + 5) % 20)
    metric = interp.logit_difference([2, 5], [7, 9])
    result = interp.patch_activation(run, clean, corrupted, metric, chunk_size=chunk_size, batch_size=2)
    want = naive_patching(run, clean, corrupted, metric, "hook_resid_pre", "position")
    np.testing.assert_allclose(result.patched, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(want[:, :2], float(result.corrupted), atol=1e-5)  # the shared prefix: no-ops
    assert np.ptp(want[1, 2:]) > 1e-3  # the patches after the edit do change the metric


@pytest.mark.parametrize("model,start", [("dense", 0), ("dense", 2), ("moe_capacity", 2)])
def test_a_suffix_run_patching_everything_gives_the_clean_suffix_and_nothing_the_corrupted_logits(model, start):
    run, clean, corrupted = make_pair(MODELS[model])
    layer, name = 1, "blocks.1.hook_resid_pre"
    corrupted_logits, corrupted_cache = interp.run_with_cache(run, corrupted, [name])
    clean_logits, clean_cache = interp.run_with_cache(run, clean, [name])
    everything = interp.run_with_hooks(run, corrupted, {name: lambda x: x.at[:, start:].set(clean_cache[name][:, start:])})
    state = suffix_patching.decode_states(run, corrupted, [start])[start]
    edits = [lambda x, i, offset: clean_cache[name][:, offset:offset + x.shape[1]], lambda x, i, offset: x]
    for edit, want in zip(edits, (everything, corrupted_logits)):
        for read_position, metric in ((None, lambda logits: logits), (3, lambda logits: logits[:, 3])):
            got = jax.jit(lambda: suffix_patching.run_patched_suffix(
                run, corrupted, corrupted_cache[name], corrupted_logits, state, layer, name, edit, jnp.arange(2),
                metric, start=start, read_position=read_position))()
            np.testing.assert_allclose(got, jnp.broadcast_to(metric(want), got.shape), atol=1e-5)
    if start == 0:
        np.testing.assert_allclose(everything, clean_logits, atol=1e-5)
    assert np.abs(np.asarray(everything - corrupted_logits)).max() > 1e-2


def test_a_metric_that_reads_past_its_reads_position_gets_nan(pair):
    run, clean, corrupted = pair
    liar = lambda logits: jnp.sum(logits[:, 1:, 0])  # noqa: E731
    liar.reads_position = -1
    patched = np.asarray(interp.patch_activation(run, clean, corrupted, liar, chunk_size=2).patched)
    assert np.isnan(patched[:, :4]).all()  # chunks from 0 and 2: positions 1.. are not computed
    assert np.isfinite(patched[:, 4]).all()  # the chunk from 4: positions 1..3 are the corrupted run's, as they must


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
