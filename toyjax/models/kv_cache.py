"""KV-cache decoding for the decoder, the Flax way: a `decode=True` call mode with a 'cache' variable collection.

    cache = init_cache(model, batch, length)                      # zeros, shaped by a decode-mode init
    logits, updated = model.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
    cache = updated["cache"]                                      # tokens: [batch, n], any n >= 1

Each call appends n tokens per row at that row's next position and returns their logits, equal (up to float
rounding) to the logits at those positions of the full forward over the whole sequence. The collection holds

    next_position                      [batch] int32   where each row's next token goes (and its position)
    block_i/attention/kv_cache/key     [batch, length, heads, head_dim]   keys after rotary, position j in slot j
    block_i/attention/kv_cache/value   [batch, length, heads, head_dim]

and a layer with per-row decoding state of its own (e.g. an MoE's per-row expert counts under block_i/ffn) adds
its entries beside these: init_cache builds whatever the decode-mode init declares.

The attention math lives in pure functions registered per kind (registry.register_cached_attention): dense
`attention.attend_to_cache` and top-k `topk_attention.topk_attend_to_cache`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from toyjax.config import ModelConfig
from toyjax.models import registry


def write_at_positions(cache, new, start):
    """Returns cache [batch, length, ...] with new [batch, n, ...] written at slots start[b] .. start[b] + n - 1 of row b."""
    return jax.vmap(lambda rows, update, at: jax.lax.dynamic_update_slice_in_dim(rows, update, at, axis=0))(
        cache, new.astype(cache.dtype), start)


class KVCache(nn.Module):
    """Appends keys and values [batch, n, heads, head_dim] at each row's position; returns the whole cache."""

    @nn.compact
    def __call__(self, k, v, start):
        # The decode-mode init sizes the cache from its input: [batch, length] tokens give `length` slots.
        cached_key = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        cached_key.value = write_at_positions(cached_key.value, k, start)
        cached_value.value = write_at_positions(cached_value.value, v, start)
        return cached_key.value, cached_value.value


def kv_cache_unsupported_reason(cfg: ModelConfig) -> str | None:
    """Returns why a decoder with this config cannot decode with a KV cache, or None when it can."""
    if not registry.has_cached_attention(cfg.attention):
        return f"model.attention={cfg.attention!r} has no KV-cache form"
    if cfg.ffn not in ("dense", "moe"):
        return f"model.ffn={cfg.ffn!r} is not known to act on each token alone"
    return None


def init_cache(model, batch: int, length: int):
    """Returns a zero 'cache' collection for decoding `batch` rows of up to `length` tokens with `model` (a Decoder)."""
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    features = None
    if model.cfg.grammar_state_embedding:
        features = jax.ShapeDtypeStruct((batch, length, len(model.cfg.grammar_feature_sizes)), jnp.int32)
    shapes = jax.eval_shape(lambda t, f: model.init(jax.random.key(0), t, state_features=f, decode=True), tokens, features)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
