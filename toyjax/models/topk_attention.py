"""Top-k sparse attention: each query keeps its k largest scores and gathers only those k value rows.

    scores = q·kᵀ/√d  →  top_k per query (never a future key when causal)  →  softmax over the k kept scores
    →  gather the k kept rows of v  →  weighted sum.

Unlike the published reference (Gupta et al. 2021), nothing is scattered back into a dense [L, L] matrix: the
values are read with a gather, and the backward pass is sparse too. A custom VJP saves only the kept indices and
weights ([batch, heads, length, k] each) and computes every gradient from them with gathers and scatter-adds:

    dv[idx] += w·g        dw = g·v[idx]        ds = w·(dw − Σ w·dw)/√d        dq = Σ ds·k[idx]        dk[idx] += ds·q

This is the exact gradient of the top-k function (the selection itself is piecewise constant), it costs
O(L·k·d) instead of autodiff's O(L²·d) (autodiff would scatter into dense [L, L] score cotangents and multiply
them back through q·kᵀ), and it never has to recompute the scores.

With `query_chunk`, the forward runs query chunks under `lax.map`; each writes its scores, key block by key
block (4·query_chunk keys each), into one [chunk, L] buffer, a causal chunk stopping at its last visible block
(halving the work), and selects once with `block_prefiltered_top_k`: an exact top-k that calls `lax.top_k` on
the row's block maxima and then on the keys of the best blocks only, since `lax.top_k` on CPU costs a lot per
row and per element. The backward runs chunks of at most 32 queries under `lax.fori_loop`. Peak memory is then
O(chunk·L + chunk·k·d + L·k + L·d) in both passes (1/32 of the [L, L] scores at L=4096 with chunk 128).
(`_topk_attention_autodiff` below is the plain version: autodiff with `jax.checkpoint` per chunk, kept for the
benchmark that measures the difference.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from toyjax.models.hooks import no_hook
from toyjax.models.registry import register_attention, register_cached_attention

_BACKWARD_CHUNK = 32  # queries per backward step: 4 gathers of [32, k, head_dim] per head stay small
_SELECTION_BLOCK = 16  # keys per block of the block-maxima pre-filter (see block_prefiltered_top_k)


def _check_inputs(q, k, v, top_k, query_chunk):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"topk_attention: {name} must be [batch, length, heads, head_dim], got shape {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"topk_attention: k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"topk_attention: q {q.shape} and k {k.shape} disagree on batch, heads or head_dim")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"topk_attention: top_k must be a positive int, got {top_k!r}")
    if query_chunk is not None and (not isinstance(query_chunk, int) or query_chunk < 1):
        raise ValueError(f"topk_attention: query_chunk must be None or a positive int, got {query_chunk!r}")


def _accumulation_dtype(x):
    """float32 for low-precision inputs, the input dtype for float32/float64 (tests run in float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _gather_rows(x, idx):
    """Returns x[b, idx[b, h, c, j], h, :] as [batch, heads, chunk, k, head_dim] (x: [batch, keys, heads, d])."""
    return jax.vmap(jax.vmap(lambda rows, i: rows[i], in_axes=(1, 0)))(x, idx)


def _scatter_add_rows(total, updates, idx):
    """Returns total [batch, keys, heads, d] with updates [b, h, c, k, d] added at key rows idx [b, h, c, k]."""

    def one(rows, upd, i):
        return rows.at[i.reshape(-1)].add(upd.reshape(-1, upd.shape[-1]))

    return jax.vmap(jax.vmap(one, in_axes=(1, 0, 0), out_axes=1))(total, updates, idx)


def _masked_scores(q_chunk, k_block, positions, key_positions, *, causal, offset, n_keys):
    """Returns q·kᵀ [batch, heads, chunk, block] with -inf where a key is in the future or is padding."""
    scores = jnp.einsum("bhcd,bkhd->bhck", q_chunk, k_block, preferred_element_type=_accumulation_dtype(q_chunk))
    visible = key_positions[None, :] < n_keys
    if causal:
        visible = visible & (key_positions[None, :] <= positions[:, None] + offset)  # [chunk, block]
    return jnp.where(visible, scores, -jnp.inf)


def block_prefiltered_top_k(scores, top_k, *, block_size=16, approx=False):
    """Returns (values, indices) equal to jax.lax.top_k(scores, top_k), found in two smaller top-k calls.

    lax.top_k on CPU pays a fixed cost per row plus a cost per element; a causal score row is long (L keys), so
    the row is first cut into blocks of block_size keys and reduced to its block maxima:

        1. top_k over the block maxima picks top_k blocks (ties: the lower block index, as lax.top_k does);
        2. those blocks' scores, gathered in ascending key order, are the top_k · block_size candidates;
        3. top_k over the candidates gives the answer, with ascending order keeping lax.top_k's tie-breaking.

    Why the top_k keys overall lie in the chosen blocks. Order keys by (score descending, index ascending), the
    order lax.top_k keeps; let T be the smallest block maximum chosen. Take a key x in a block B not chosen, so
    max(B) <= T. Each chosen block C holds its maximum key c with score(c) >= T >= score(x). If score(c) > score(x)
    c ranks above x; if they are equal, then score(x) = max(B) = T = max(C) is a tie that step 1 broke for C, so C
    comes before B, c's index is below x's, and c still ranks above x. So top_k distinct keys rank above x, and x
    is not among the top_k. Masked keys score -inf: they are chosen only when a row holds fewer than top_k
    finite scores, exactly as lax.top_k would, and at the same (lowest) indices.
    """
    length = scores.shape[-1]
    n_blocks = -(-length // block_size)
    if n_blocks <= top_k or top_k * block_size >= length:  # no saving: the candidates would be the whole row
        return _top_k(scores, top_k, approx)
    # Padding scores -inf at the highest indices: they rank below every real key, -inf ones included.
    pad = [(0, 0)] * (scores.ndim - 1) + [(0, n_blocks * block_size - length)]
    blocks = jnp.pad(scores, pad, constant_values=-jnp.inf).reshape(scores.shape[:-1] + (n_blocks, block_size))
    _, chosen_blocks = _top_k(jnp.max(blocks, axis=-1), top_k, approx)
    chosen_blocks = jnp.sort(chosen_blocks, axis=-1)  # ascending key order, so ties break as in one lax.top_k
    candidates = jnp.take_along_axis(blocks, chosen_blocks[..., None], axis=-2)  # [..., top_k, block_size]
    values, slots = _top_k(candidates.reshape(scores.shape[:-1] + (top_k * block_size,)), top_k, approx)
    # Candidate slot s is key block_size·chosen_blocks[s // block_size] + s % block_size (no index array needed).
    block_of_slot = jnp.take_along_axis(chosen_blocks, slots // block_size, axis=-1)
    return values, block_of_slot * block_size + slots % block_size


def _top_k(scores, top_k, approx):
    return jax.lax.approx_max_k(scores, top_k) if approx else jax.lax.top_k(scores, top_k)


def _kept_full_rows(q_chunk, positions, k, *, top_k, causal, offset, approx):
    """Returns (kept scores, key indices) [batch, heads, chunk, top_k] from one [chunk, L] score matrix."""
    n_keys = k.shape[1]
    scores = _masked_scores(q_chunk, k, positions, jnp.arange(n_keys), causal=causal, offset=offset, n_keys=n_keys)
    return block_prefiltered_top_k(scores, top_k, block_size=_SELECTION_BLOCK, approx=approx)


def _kept_streamed(q_chunk, positions, k, *, top_k, causal, offset, approx, key_block):
    """Same as _kept_full_rows, computing only the key blocks of key_block keys that the chunk can see.

    The [chunk, L] scores are written block by block into a -inf buffer; a causal chunk stops at the last key
    block it can see, which halves the matmul work of a causal layer. One selection over the whole buffer then
    costs far less than merging a running top-k after every block (lax.top_k's cost per row dominates).
    """
    n_keys = k.shape[1]
    n_blocks = -(-n_keys // key_block)
    k = jnp.pad(k, [(0, 0), (0, n_blocks * key_block - n_keys), (0, 0), (0, 0)])
    batch, heads, chunk, _ = q_chunk.shape
    init = jnp.full((batch, heads, chunk, n_blocks * key_block), -jnp.inf, _accumulation_dtype(q_chunk))

    def write_block(block, scores):
        key_positions = block * key_block + jnp.arange(key_block)
        k_block = jax.lax.dynamic_slice_in_dim(k, block * key_block, key_block, axis=1)
        block_scores = _masked_scores(
            q_chunk, k_block, positions, key_positions, causal=causal, offset=offset, n_keys=n_keys
        )
        return jax.lax.dynamic_update_slice_in_dim(scores, block_scores, block * key_block, axis=3)

    n_needed = n_blocks
    if causal:
        n_needed = jnp.minimum(n_blocks, (jnp.max(positions) + offset) // key_block + 1)
    scores = jax.lax.fori_loop(0, n_needed, write_block, init)
    return block_prefiltered_top_k(scores, top_k, block_size=_SELECTION_BLOCK, approx=approx)


def _kept_weights(kept_scores, indices, positions, *, causal, offset, n_keys):
    """Returns (softmax weights over the kept scores, valid mask), zero weight on slots a query cannot fill."""
    # A query that sees fewer than top_k keys gets -inf slots with arbitrary or -1 indices: mark them invalid.
    valid = (indices >= 0) & (indices < n_keys)
    if causal:
        valid = valid & (indices <= positions[:, None] + offset)
    kept_scores = jnp.where(valid, kept_scores, -jnp.inf)
    row_max = jnp.max(kept_scores, axis=-1, keepdims=True)  # finite: a causal query always sees itself
    exp = jnp.where(valid, jnp.exp(kept_scores - row_max), 0.0)
    return exp / jnp.sum(exp, axis=-1, keepdims=True), valid


def _chunked(x, chunk):
    """[batch, heads, length, ...] -> [n_chunks, batch, heads, chunk, ...] (length padded to a multiple)."""
    length = x.shape[2]
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    x = x.reshape(x.shape[:2] + (n_chunks, chunk) + x.shape[3:])
    return jnp.moveaxis(x, 2, 0)


def _unchunked(x, length):
    """Inverse of _chunked: [n_chunks, batch, heads, chunk, ...] -> [batch, heads, length, ...]."""
    x = jnp.moveaxis(x, 0, 2)
    x = x.reshape(x.shape[:2] + (-1,) + x.shape[4:])
    return x[:, :, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _topk_core(q_t, k, v, top_k, causal, chunk, key_block, approx):
    """Returns (out [b, h, Lq, d], indices [b, h, Lq, k], weights [b, h, Lq, k]).

    q_t: [b, h, Lq, d], pre-scaled by 1/√d; k, v stay [b, Lk, h, d] (no transposed copies of the keys).

    key_block: None = one [chunk, L] score matrix per query chunk; else stream over blocks of that many keys.
    """
    outputs, _ = _topk_forward(q_t, k, v, top_k, causal, chunk, key_block, approx)
    return outputs


def _topk_forward(q_t, k, v, top_k, causal, chunk, key_block, approx):
    length, n_keys = q_t.shape[2], k.shape[1]
    offset = n_keys - length
    n_chunks = -(-length // chunk)
    q_padded = jnp.pad(q_t, [(0, 0), (0, 0), (0, n_chunks * chunk - length), (0, 0)])

    def one_chunk(i):
        # Sliced here rather than pre-chunked: a chunked copy of q would be one more [b, h, L, d] buffer.
        q_chunk = jax.lax.dynamic_slice_in_dim(q_padded, i * chunk, chunk, axis=2)
        chunk_positions = i * chunk + jnp.arange(chunk)
        options = dict(top_k=top_k, causal=causal, offset=offset, approx=approx)
        if key_block is None:
            kept_scores, indices = _kept_full_rows(q_chunk, chunk_positions, k, **options)
        else:
            kept_scores, indices = _kept_streamed(q_chunk, chunk_positions, k, key_block=key_block, **options)
        weights, valid = _kept_weights(
            kept_scores, indices, chunk_positions, causal=causal, offset=offset, n_keys=n_keys
        )
        indices = jnp.where(valid, indices, 0)  # padding keys or unfilled slots: read row 0 with weight 0
        values = _gather_rows(v, indices)  # [b, h, chunk, k, d]
        out = jnp.einsum("bhck,bhckd->bhcd", weights.astype(v.dtype), values)
        return out, jnp.where(valid, indices, -1), weights

    out, indices, weights = jax.lax.map(one_chunk, jnp.arange(n_chunks))
    out, indices, weights = (_unchunked(x, length) for x in (out, indices, weights))
    return (out, indices, weights), (q_t, k, v, indices, weights)


_topk_core_fwd = _topk_forward


def _topk_core_bwd(top_k, causal, chunk, key_block, approx, residuals, cotangents):
    q_t, k, v, indices, weights = residuals
    g_out, _, g_weights = cotangents  # indices are integers: no cotangent
    length = q_t.shape[2]
    acc = _accumulation_dtype(q_t)
    # Backward chunks need no [chunk, L] scores, only [chunk, k, d] gathers: smaller chunks bound them.
    chunk = min(chunk, _BACKWARD_CHUNK)
    n_chunks = -(-length // chunk)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, n_chunks * chunk - length), (0, 0)])  # noqa: E731
    if n_chunks * chunk != length:
        q_t, g_out, indices, weights, g_weights = map(pad, (q_t, g_out, indices, weights, g_weights))
    # Chunks are sliced in place and dq written in place (no stacked copies): O(L·d) buffers stay few.
    take = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=2)  # noqa: E731

    def one_chunk(i, carry):
        dq, dk, dv = carry
        q_chunk, g_chunk, idx, w, g_w = (take(x, i) for x in (q_t, g_out, indices, weights, g_weights))
        g_chunk, w = g_chunk.astype(acc), w.astype(acc)
        idx = jnp.maximum(idx, 0)  # unfilled slots (-1) have weight 0, so any row will do
        dv = _scatter_add_rows(dv, w[..., None] * g_chunk[:, :, :, None, :], idx)
        dw = jnp.einsum("bhcd,bhckd->bhck", g_chunk, _gather_rows(v, idx).astype(acc)) + g_w
        ds = w * (dw - jnp.sum(w * dw, axis=-1, keepdims=True))  # softmax backward; 0 on invalid slots
        dq_chunk = jnp.einsum("bhck,bhckd->bhcd", ds, _gather_rows(k, idx).astype(acc))
        dk = _scatter_add_rows(dk, ds[..., None] * q_chunk.astype(acc)[:, :, :, None, :], idx)
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_chunk.astype(dq.dtype), i * chunk, axis=2), dk, dv

    zeros = jnp.zeros(k.shape, acc)
    dq, dk, dv = jax.lax.fori_loop(0, n_chunks, one_chunk, (jnp.zeros(q_t.shape, q_t.dtype), zeros, zeros))
    return dq[:, :, :length], dk.astype(k.dtype), dv.astype(v.dtype)


_topk_core.defvjp(_topk_core_fwd, _topk_core_bwd)


@functools.partial(jax.jit, static_argnames=("top_k", "causal", "query_chunk", "approx", "return_indices"))
def topk_attention(q, k, v, *, top_k, causal=True, query_chunk=None, approx=False, return_indices=False):
    """Returns top-k attention output [batch, length, heads, head_dim] (plus indices and weights if asked).

    q: [batch, q_length, heads, head_dim]; k, v: [batch, k_length, heads, head_dim]. When causal, query i sees
    keys j <= i + (k_length - q_length). top_k is clipped to k_length, so top_k >= length is dense attention.
    query_chunk: process this many queries at a time (bounded memory); None = all at once.
    approx: use jax.lax.approx_max_k (fast on TPU; on CPU/GPU it is exact or close to it).
    return_indices: also return the kept key indices [batch, q_length, heads, k] (-1 for slots a query could
    not fill because it sees fewer than k keys) and their softmax weights [batch, q_length, heads, k] (0 there).
    """
    _check_inputs(q, k, v, top_k, query_chunk)
    top_k = min(top_k, k.shape[1])
    chunk = q.shape[1] if query_chunk is None else min(query_chunk, q.shape[1])
    to_heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731
    q_t = to_heads_first(q) * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    # Chunked: score keys in blocks of 4 chunks, skipping the blocks a causal chunk cannot see (_kept_streamed).
    key_block = None if query_chunk is None or 4 * chunk >= k.shape[1] else 4 * chunk
    out, indices, weights = _topk_core(q_t, k, v, top_k, causal, chunk, key_block, approx)
    out = to_heads_first(out)
    if not return_indices:
        return out
    return out, to_heads_first(indices), to_heads_first(weights)


@functools.partial(jax.jit, static_argnames=("top_k", "causal", "query_chunk"))
def _topk_attention_autodiff(q, k, v, *, top_k, causal=True, query_chunk=None):
    """Returns the same output as topk_attention, differentiated by plain autodiff (for the benchmark).

    Each query chunk runs under jax.checkpoint inside lax.map, so the backward saves only the chunk inputs and
    recomputes the chunk's [chunk, L] scores; but the backward of top_k scatters the kept cotangents into a
    dense [chunk, L] array and pushes it back through q·kᵀ, so the backward costs O(L²·d) time.
    """
    _check_inputs(q, k, v, top_k, query_chunk)
    top_k = min(top_k, k.shape[1])
    length, offset = q.shape[1], k.shape[1] - q.shape[1]
    chunk = length if query_chunk is None else min(query_chunk, length)
    to_heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731
    q_t = to_heads_first(q) * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)

    @jax.checkpoint
    def one_chunk(args):
        q_chunk, chunk_positions = args
        kept_scores, indices = _kept_full_rows(
            q_chunk, chunk_positions, k, top_k=top_k, causal=causal, offset=offset, approx=False
        )
        weights, _ = _kept_weights(kept_scores, indices, chunk_positions, causal=causal, offset=offset, n_keys=k.shape[1])
        return jnp.einsum("bhck,bhckd->bhcd", weights.astype(v.dtype), _gather_rows(v, indices))

    positions = _chunked(jnp.arange(length)[None, None], chunk)[:, 0, 0]
    out = jax.lax.map(one_chunk, (_chunked(q_t, chunk), positions))
    return to_heads_first(_unchunked(out, length))


@register_attention("topk")
def topk_attention_kind(q, k, v, *, causal, cfg, hook=no_hook):
    """Registry entry: model.attention="topk" with model.attention_top_k and model.attention_query_chunk.

    hook sees the kept key indices and weights as [batch, heads, query, top_k], read-only: they are computed
    inside the fused kernel, so rewriting them could not change the output.
    """
    query_chunk = cfg.attention_query_chunk or None
    out, indices, weights = topk_attention(
        q, k, v, top_k=cfg.attention_top_k, causal=causal, query_chunk=query_chunk, return_indices=True
    )
    hook("topk_indices", jnp.swapaxes(indices, 1, 2), editable=False)
    hook("topk_weights", jnp.swapaxes(weights, 1, 2), editable=False)
    return out, {"topk_indices": indices, "topk_weights": weights}


def topk_attend_to_cache(q, cached_k, cached_v, query_positions, *, top_k: int):
    """Returns (out [batch, q_len, heads, head_dim], indices, weights [batch, q_len, heads, k]) against a KV cache.

    q at query_positions [batch, q_len]; cached_k, cached_v: [batch, cache_length, heads, head_dim], key j in slot j.
    The query at position p keeps the top_k of its scores against slots <= p, exactly as topk_attention's causal
    query p does over the full sequence (same scaling, same tie order), so its output is that query's row there.
    Indices are -1 and weights 0 in slots a query cannot fill (it sees fewer than top_k keys).
    """
    _check_inputs(q, cached_k, cached_v, top_k, None)
    top_k = min(top_k, cached_k.shape[1])
    q_t = jnp.transpose(q, (0, 2, 1, 3)) * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)  # [b, h, q, d]
    scores = jnp.einsum("bhqd,bkhd->bhqk", q_t, cached_k, preferred_element_type=_accumulation_dtype(q_t))
    positions = query_positions[:, None, :, None]  # [batch, 1, q_len, 1]
    scores = jnp.where(jnp.arange(cached_k.shape[1]) <= positions, scores, -jnp.inf)
    kept_scores, indices = jax.lax.top_k(scores, top_k)
    valid = indices <= positions  # slots past the visible keys hold -inf scores with arbitrary indices
    kept_scores = jnp.where(valid, kept_scores, -jnp.inf)
    exp = jnp.where(valid, jnp.exp(kept_scores - jnp.max(kept_scores, axis=-1, keepdims=True)), 0.0)
    weights = exp / jnp.sum(exp, axis=-1, keepdims=True)
    indices = jnp.where(valid, indices, 0)
    out = jnp.einsum("bhqk,bhqkd->bhqd", weights.astype(cached_v.dtype), _gather_rows(cached_v, indices))
    to_queries_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731
    return to_queries_first(out), to_queries_first(jnp.where(valid, indices, -1)), to_queries_first(weights)


@register_cached_attention("topk")
def topk_cached_attention_kind(q, cached_k, cached_v, query_positions, *, cfg):
    """Registry entry: the KV-cache form of model.attention="topk" (same top-k per query as the full forward)."""
    out, indices, weights = topk_attend_to_cache(q, cached_k, cached_v, query_positions, top_k=cfg.attention_top_k)
    return out, {"topk_indices": indices, "topk_weights": weights}
