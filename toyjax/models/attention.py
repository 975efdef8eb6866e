"""Attention kinds as pure functions over [batch, length, heads, head_dim] arrays, registered by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from toyjax.models.hooks import no_hook
from toyjax.models.registry import register_attention, register_cached_attention


def causal_mask(q_len: int, k_len: int) -> jax.Array:
    """Returns [q_len, k_len] booleans, True where query i may see key j (j <= i, aligned at the end)."""
    return jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None] + (k_len - q_len)


def attention_weights(q, k, *, causal: bool = True, hook=no_hook) -> jax.Array:
    """Returns softmax attention probabilities [batch, heads, q_len, k_len] in float32.

    hook(name, x) sees (and may rewrite) the masked scores ("attn_scores") and the probabilities ("pattern").
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        scores = jnp.where(causal_mask(q.shape[1], k.shape[1]), scores, -jnp.inf)
    return hook("pattern", jax.nn.softmax(hook("attn_scores", scores), axis=-1))


def dense_attention(q, k, v, *, causal: bool = True, return_weights: bool = False, hook=no_hook):
    """Returns softmax(q k^T / sqrt(d)) v, shaped like q (and the weights if asked); hook: see attention_weights."""
    weights = attention_weights(q, k, causal=causal, hook=hook)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    return (out, weights) if return_weights else out


@register_attention("dense")
def _dense(q, k, v, *, causal, cfg, hook=no_hook):
    out, weights = dense_attention(q, k, v, causal=causal, return_weights=True, hook=hook)
    return out, {"attention_weights": weights}


def visible_cache_slots(query_positions, cache_length: int) -> jax.Array:
    """Returns [batch, q_len, cache_length] booleans, True where the query at that position may see cache slot j (j <= it)."""
    return jnp.arange(cache_length)[None, None, :] <= query_positions[:, :, None]


def attend_to_cache(q, cached_k, cached_v, query_positions, *, return_weights: bool = False):
    """Returns dense attention of queries to a KV cache, shaped like q (and the weights if asked).

    q: [batch, q_len, heads, head_dim] at query_positions [batch, q_len]; cached_k, cached_v: [batch, cache_length,
    heads, head_dim] with the key of position j in slot j. A query at position p sees slots <= p, so its output is
    its row of dense_attention over the full sequence (slots after p may hold anything).
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, cached_k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible_cache_slots(query_positions, cached_k.shape[1])[:, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(cached_v.dtype), cached_v)
    return (out, weights) if return_weights else out


@register_cached_attention("dense")
def _dense_cached(q, cached_k, cached_v, query_positions, *, cfg):
    out, weights = attend_to_cache(q, cached_k, cached_v, query_positions, return_weights=True)
    return out, {"attention_weights": weights}


def apply_rotary(x, positions, base: float = 10_000.0):
    """Rotates pairs of features of x [batch, length, heads, head_dim] by position-dependent angles (RoPE)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, :, None, None].astype(jnp.float32) * freqs  # [batch, length, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


# Top-k attention lives in its own module and registers itself as "topk" on import.
from toyjax.models.topk_attention import topk_attention  # noqa: F401,E402
