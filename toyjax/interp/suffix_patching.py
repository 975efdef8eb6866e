"""Patched runs that compute only what a patch can change: the positions from the patched one on.

A causal model's outputs at positions before p do not depend on anything at p or later, so a run patched at
position p equals the corrupted run before p. Each patched run here starts from the corrupted run's KV-cache state
at a chunk start s <= p (keys and values of every layer at positions < s, models/kv_cache.py) and decodes
positions s.. only, with blocks.{layer}.hook_resid_pre replaced by the corrupted run's cached residual stream, so
the layers below the patched one are dead code. When the metric reads one position q alone, the run stops at q and
splits in two: positions s..q-1 only fill the cache (their last layer after the keys and values, final LayerNorm
and unembedding are dead code), then position q alone runs every layer from the patched one up to the logits.

toyjax.interp.patch_activation uses this for position indices; tests/test_patching.py checks it against one full
hooked forward pass per index.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from toyjax.config import ModelConfig
from toyjax.interp.hooked import model_and_variables, run_with_hooks
from toyjax.models.kv_cache import init_cache, kv_cache_unsupported_reason

# Per-layer activations laid out [batch, pos, ...] that the KV-cache (decode) forward passes through too; the
# attention pattern and scores are not among them (the cached attention does not expose them).
PER_POSITION_ACTIVATIONS = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z",
    "mlp.hook_pre", "mlp.hook_post", "mlp.hook_router_logits")

# edit(x, index, offset): x holds positions offset .. offset + x.shape[1] - 1 of the patched activation.
SuffixEdit = Callable[[jax.Array, jax.Array, int], jax.Array]


def causal_suffix_patching_applies(cfg: ModelConfig, activation: str) -> bool:
    """Returns whether position patches of blocks.{i}.{activation} can run on suffixes (a KV-cache-capable model)."""
    return (activation in PER_POSITION_ACTIVATIONS and kv_cache_unsupported_reason(cfg) is None
            and not cfg.grammar_state_embedding)


def decode_states(run, tokens, starts: Iterable[int]) -> dict[int, dict]:
    """Returns {start: the 'cache' collection after decoding tokens[:, :start]} (one forward pass in all)."""
    model, variables = model_and_variables(run)
    cache = init_cache(model, tokens.shape[0], tokens.shape[1])
    states, done = {}, 0
    for start in sorted(set(starts)):
        if start > done:
            _, updated = model.apply({**variables, "cache": cache}, tokens[:, done:start], decode=True,
                                     mutable=["cache"])
            cache, done = updated["cache"], start
        states[start] = cache
    return states


def run_patched_suffix(run, corrupted_tokens, corrupted_resid, corrupted_logits, decode_state, layer: int, hook: str,
                       edit: SuffixEdit, indices, metric, *, start: int, read_position: int | None = None,
                       batch_size: int | None = None) -> jax.Array:
    """Returns metric(logits) of one corrupted run per index (leading axis), each with hook's value edited, computing
    positions start.. only; every index must patch positions >= start.

    corrupted_resid: the corrupted run's blocks.{layer}.hook_resid_pre [batch, pos, d_model]; corrupted_logits its
    logits, which stand for the positions before start. decode_state: the 'cache' collection after the corrupted
    tokens before start (decode_states). read_position (>= start, non-negative): the only logits position the metric
    reads; the logits it gets elsewhere from start on are NaN, so a metric that reads them shows it.
    """
    model, variables = model_and_variables(run)
    resid_name = f"blocks.{layer}.hook_resid_pre"
    n_pos = corrupted_tokens.shape[1]

    def stage(cache, first, stop, index):
        """Returns (logits [batch, stop - first, vocab], {"cache": ...}) of positions first .. stop - 1."""
        resid = corrupted_resid[:, first:stop]
        if hook == resid_name:
            hooks = {resid_name: edit(resid, index, first)}
        else:
            hooks = {resid_name: resid, hook: lambda x: edit(x, index, first)}
        return run_with_hooks((model, {**variables, "cache": cache}), corrupted_tokens[:, first:stop], hooks,
                              decode=True, mutable=["cache"])

    def nan_logits(length):
        return jnp.full(corrupted_logits.shape[:1] + (length,) + corrupted_logits.shape[2:], jnp.nan,
                        corrupted_logits.dtype)

    def one(index):
        before = corrupted_logits[:, :start]
        if read_position is None:
            return metric(jnp.concatenate([before, stage(decode_state, start, n_pos, index)[0]], axis=1))
        cache = decode_state
        if read_position > start:  # fill the cache up to the read position; its logits are never computed
            cache = stage(cache, start, read_position, index)[1]["cache"]
        read = stage(cache, read_position, read_position + 1, index)[0]
        return metric(jnp.concatenate([before, nan_logits(read_position - start), read,
                                       nan_logits(n_pos - read_position - 1)], axis=1))

    if batch_size is None:
        return jax.vmap(one)(indices)
    return jax.lax.map(one, indices, batch_size=batch_size)
