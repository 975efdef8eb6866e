"""Registries of pluggable decoder parts, chosen by name in the config (`model.attention`, `model.ffn`).

Attention kind: a pure function
    fn(q, k, v, *, causal: bool, cfg: ModelConfig) -> (out, extras)
with q, k, v and out shaped [batch, length, heads, head_dim] (q and k already carry their positions) and
extras a dict of arrays the decoder sows into the 'intermediates' collection (e.g. top-k indices), maybe empty.
It passes internal activations through hook(name, x, *, editable=True) -> x (default: identity) and uses the
result, so toyjax.interp can cache or rewrite them (e.g. "attn_scores", "pattern"); editable=False for values
that are only read out.

KV-cache form of an attention kind (decoding one or a few tokens at a time, see toyjax/models/kv_cache.py):
    fn(q, cached_k, cached_v, query_positions, *, cfg: ModelConfig) -> (out, extras)
with q, out [batch, q_length, heads, head_dim], cached_k, cached_v [batch, cache_length, heads, head_dim] (key j
at slot j) and query_positions [batch, q_length]: each query sees the cache slots <= its position, and its output
equals that query's row of the full causal forward.

Feed-forward kind: a linen Module class, built as Kind(cfg=model_cfg) and called as
    module(x, *, deterministic: bool, decode: bool) -> y        # x, y: [batch, length, d_model]
(decode: x continues each row of a KV-cache decode; a kind whose output depends on earlier tokens keeps what it
needs in the 'cache' collection, as the MoE layer keeps each row's expert counts),
It may sow scalars into 'aux_loss' (the trainer adds every leaf to the loss) and into 'metrics'
(the trainer averages and logs them), and draw randomness with self.make_rng('noise') when not deterministic.
"""

from __future__ import annotations

from typing import Callable

ATTENTION: dict[str, Callable] = {}
CACHED_ATTENTION: dict[str, Callable] = {}
FFN: dict[str, type] = {}


def register_attention(name: str):
    def wrap(fn):
        ATTENTION[name] = fn
        return fn

    return wrap


def register_cached_attention(name: str):
    def wrap(fn):
        CACHED_ATTENTION[name] = fn
        return fn

    return wrap


def register_ffn(name: str):
    def wrap(cls):
        FFN[name] = cls
        return cls

    return wrap


def _lookup(table: dict, name: str, what: str):
    # The built-in kinds register themselves when the toyjax.models package is imported (its __init__).
    if name not in table:
        raise ValueError(f"unknown {what} '{name}'; registered: {', '.join(sorted(table))}")
    return table[name]


def get_attention(name: str) -> Callable:
    return _lookup(ATTENTION, name, "model.attention")


def get_cached_attention(name: str) -> Callable:
    return _lookup(CACHED_ATTENTION, name, "KV-cache form of model.attention")


def has_cached_attention(name: str) -> bool:
    """Returns whether attention kind `name` has a KV-cache form (registered with register_cached_attention)."""
    try:
        get_cached_attention(name)
    except ValueError:
        return False
    return True


def get_ffn(name: str) -> type:
    return _lookup(FFN, name, "model.ffn")
