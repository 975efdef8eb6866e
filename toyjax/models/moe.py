"""Mixture-of-experts feed-forward layers: noisy top-k gating (Shazeer et al. 2017) and Switch routing (Fedus et al.
2021), with two dispatch forms that compute the same function.

    router (float32)  →  top-k experts and gates per token  →  capacity: each sequence fills its experts' slots in
    position order; a token over capacity gets gate 0, so the layer outputs 0 for it and the residual stream carries
    it past  →  each expert is Dense→GELU→Dense  →  gate-weighted sum.

Capacity is causal: the capacity group is one sequence (row), and a token's fate depends only on the earlier tokens
of its own row, never on later tokens or on other rows of the batch. Precisely, the j-th choice of the token at
position t in row b takes
    slot = number of earlier assignments to that expert in row b
           (all choices of positions < t, then choices < j of position t),
and is kept iff slot < capacity, with capacity = expert_capacity(cfg.max_len, n_experts, top_k, capacity_factor)
(`sequence_capacity`): fixed by the context length, not by the input's length, so appending tokens never changes
an earlier token's fate and a step-by-step (KV-cache) decoder can reproduce the full forward by carrying each row's
per-expert counts from step to step (`causal_slots`). capacity_factor 0 is dropless (capacity = max_len).
The GShard / Switch training order (one queue per expert over the whole batch, every token's first choice before
any second choice) leaks later tokens and other rows into a token's output; it stays available only as
`assign_slots(..., priority="gshard")` for reproducing those papers' setups, and the layer never uses it.

Dispatch forms (same gates, same capacity rule, same result up to float rounding):
  "einsum": one-hot dispatch/combine tensors [batch, length, experts, capacity] (GShard, one group per row); static
            shapes, the TPU form. It costs O(tokens·experts·capacity·d_model) on top of the experts.
  "sort":   assignments sorted by expert so that each expert owns a contiguous slice of rows, then a grouped matmul.
            On GPU/TPU the grouped matmul is `jax.lax.ragged_dot`; on CPU (jax 0.10.2) ragged_dot is lowered as a
            dense masked matmul over every expert (≈ n_experts× the work, measured 9× slower), so there it is a loop
            over each expert's row blocks with a hand-written VJP (`grouped_matmul`). Dropped assignments are
            computed and weighted by 0 (no data-dependent shapes).
  "auto":   "sort" (measured faster on CPU, see bench/moe.py; ragged_dot is the native form on GPU), "einsum" on TPU.

Expert weights carry a leading expert axis ([experts, d_model, d_ff]) so they can be sharded over a mesh axis.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from toyjax.models.registry import register_ffn

if TYPE_CHECKING:  # annotations only: config validates ffn names against the registry, so no import back
    from toyjax.config import ModelConfig

# -- routing ------------------------------------------------------------------------------------------------------


class Routing(NamedTuple):
    expert_index: jax.Array  # [tokens, k] int32, chosen experts in decreasing preference
    gate: jax.Array  # [tokens, k] float32 combine weights before capacity
    probs: jax.Array  # [tokens, experts] float32 router distribution (dense gates for noisy top-k)
    losses: dict  # unweighted auxiliary losses (scalars)


def cv_squared(values):
    """Returns the squared coefficient of variation var/mean² of a vector (0 for a single value)."""
    values = values.astype(jnp.float32)
    return jnp.var(values) / (jnp.mean(values) ** 2 + 1e-10)


def router_z_loss(logits):
    """Returns mean over tokens of logsumexp(logits)² (ST-MoE), which keeps router logits small."""
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def noisy_top_k_routing(logits, noise_std=None, noise=None, *, top_k: int) -> Routing:
    """Returns the Shazeer et al. (2017) gating: top-k of (logits + noise·noise_std), softmax over the kept k.

    logits, noise_std, noise: [tokens, experts]; pass noise=None for the noiseless (evaluation) gate.
    Losses: "importance" = CV² of per-expert gate sums; "load" = CV² of the paper's smooth load estimate
    Σₓ Φ((logitsᵢ − kth_excludingᵢ) / noise_stdᵢ) (with noise), else CV² of the hard assignment counts.
    """
    n_experts = logits.shape[-1]
    noisy = logits if noise is None else logits + noise * noise_std
    kept, expert_index = jax.lax.top_k(noisy, top_k)
    gate = jax.nn.softmax(kept, axis=-1)
    dense_gates = jnp.einsum("tk,tke->te", gate, jax.nn.one_hot(expert_index, n_experts, dtype=gate.dtype))
    if noise is None or top_k >= n_experts:
        load = jnp.sum(jax.nn.one_hot(expert_index, n_experts), axis=(0, 1))
    else:
        # P(expert i still in the top k if its noise were redrawn): it must beat the k-th best of the others,
        # which is the (k+1)-th best overall when i is in the top k, and the k-th best otherwise.
        top_values = jax.lax.top_k(noisy, top_k + 1)[0]
        in_top_k = noisy >= top_values[:, top_k - 1 : top_k]
        threshold = jnp.where(in_top_k, top_values[:, top_k : top_k + 1], top_values[:, top_k - 1 : top_k])
        load = jnp.sum(ndtr((logits - threshold) / noise_std), axis=0)
    losses = {"importance": cv_squared(jnp.sum(dense_gates, axis=0)), "load": cv_squared(load),
              "z": router_z_loss(logits)}
    return Routing(expert_index, gate, dense_gates, losses)


def switch_routing(logits, *, top_k: int = 1) -> Routing:
    """Returns Switch routing: softmax over all experts, the top-k experts gated by their (unrenormalised) probability.

    Losses: "balance" = N·Σᵢ fᵢ·Pᵢ (fᵢ: share of assignments to expert i, Pᵢ: mean router probability; 1 when
    uniform), "z" = router z-loss.
    """
    n_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    gate, expert_index = jax.lax.top_k(probs, top_k)
    share = jnp.mean(jax.nn.one_hot(expert_index, n_experts, dtype=probs.dtype), axis=(0, 1))
    balance = n_experts * jnp.sum(share * jnp.mean(probs, axis=0))
    return Routing(expert_index, gate, probs, {"balance": balance, "z": router_z_loss(logits)})


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Returns the slots per expert for a group of n_tokens: ceil(factor·tokens·k/experts), or n_tokens when factor is 0.

    The layer's group is one sequence of cfg.max_len tokens (`sequence_capacity`); n_tokens slots are always enough
    because a token's k choices go to k different experts (dropless).
    """
    if capacity_factor < 0:
        raise ValueError(f"model.moe.capacity_factor must be >= 0 (0 = dropless), got {capacity_factor}")
    if capacity_factor == 0:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


def sequence_capacity(cfg: ModelConfig) -> int:
    """Returns the slots per expert in each sequence: expert_capacity(cfg.max_len, ...), whatever the input length."""
    return expert_capacity(cfg.max_len, cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.capacity_factor)


def causal_slots(expert_index, counts_before):
    """Returns (slot [batch, length, k] int32, counts_after [batch, experts] int32) in causal order, per row.

    expert_index: [batch, length, k]; counts_before: [batch, experts] int, each row's assignments per expert before
    the first position of expert_index (zeros for a whole sequence). The j-th choice at position t takes slot =
    counts_before + assignments to that expert at positions < t + choices < j at t; counts_after adds this chunk's
    assignments. A step-by-step decoder carries counts_after to the next step and keeps slot < sequence_capacity(cfg),
    which reproduces the full forward exactly.
    """
    batch, length, top_k = expert_index.shape
    n_experts = counts_before.shape[-1]
    counts_before = counts_before.astype(jnp.int32)
    # Flattening [length, k] row-major lists each token's k choices before the next token's: the causal order.
    one_hot = jax.nn.one_hot(expert_index.reshape(batch, length * top_k), n_experts, dtype=jnp.int32)
    earlier = jnp.cumsum(one_hot, axis=1) - one_hot + counts_before[:, None, :]  # [batch, length·k, experts]
    slot = jnp.sum(earlier * one_hot, axis=-1).reshape(batch, length, top_k)
    return slot, counts_before + jnp.sum(one_hot, axis=1)


def assign_slots(expert_index, n_experts: int, capacity: int, *, priority: str = "causal"):
    """Returns (slot, keep), both [batch, length, k] (int32, bool): each assignment's place in its expert's queue.

    expert_index: [batch, length, k]; keep is slot < capacity.
    priority="causal" (the default, and the only order the layer uses): one queue per expert and row, filled in
    position order with a token's k choices before the next token's (`causal_slots` from zero counts).
    priority="gshard": one queue per expert over the whole batch: every token's first choice (rows, then positions,
    in order), then every second choice, ... (GShard / Switch training order). NOT causal: a token's fate depends on
    later tokens and on the other rows. Only for reproducing those setups; give it capacity for batch·length tokens,
    and pass the batch as one group ([1, batch·length, ...]) to einsum_dispatch.
    """
    batch, length, top_k = expert_index.shape
    if priority == "causal":
        slot, _ = causal_slots(expert_index, jnp.zeros((batch, n_experts), jnp.int32))
    elif priority == "gshard":
        by_choice = expert_index.reshape(batch * length, top_k).T.reshape(-1)  # all first choices, then second, ...
        one_hot = jax.nn.one_hot(by_choice, n_experts, dtype=jnp.int32)  # [k·tokens, experts]
        slot = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
        slot = slot.reshape(top_k, batch * length).T.reshape(batch, length, top_k)
    else:
        raise ValueError(f"assign_slots: priority must be 'causal' or 'gshard', got {priority!r}")
    return slot, slot < capacity


# -- dispatch -----------------------------------------------------------------------------------------------------


class ExpertWeights(NamedTuple):
    w_up: jax.Array  # [experts, d_model, d_ff]
    b_up: jax.Array  # [experts, d_ff]
    w_down: jax.Array  # [experts, d_ff, d_model]
    b_down: jax.Array  # [experts, d_model]


def einsum_dispatch(x, expert_index, combine_gate, slot, experts: ExpertWeights, capacity: int):
    """Returns y [groups, length, d_model] through one-hot dispatch/combine tensors [groups, length, experts, capacity].

    x: [groups, length, d_model]; expert_index, combine_gate, slot: [groups, length, k]. Each group (a row of the
    batch) has its own `capacity` slots per expert, so no group's tokens can displace another's.
    """
    n_experts = experts.w_up.shape[0]
    in_capacity = (slot < capacity).astype(x.dtype)
    expert_hot = jax.nn.one_hot(expert_index, n_experts, dtype=x.dtype)  # [g, l, k, e]
    slot_hot = jax.nn.one_hot(slot, capacity, dtype=x.dtype) * in_capacity[..., None]  # [g, l, k, c]
    dispatch = jnp.einsum("glke,glkc->glec", expert_hot, slot_hot)
    combine = jnp.einsum("glke,glkc,glk->glec", expert_hot, slot_hot, combine_gate.astype(x.dtype))
    expert_in = jnp.einsum("glec,gld->gecd", dispatch, x)
    h = nn.gelu(jnp.einsum("gecd,edf->gecf", expert_in, experts.w_up) + experts.b_up[:, None])
    out = jnp.einsum("gecf,efd->gecd", h, experts.w_down) + experts.b_down[:, None]
    return jnp.einsum("glec,gecd->gld", combine, out)


_BIG_BLOCK, _SMALL_BLOCK = 256, 32  # rows per matmul on CPU; a group's tail runs in small blocks (less waste)


def _for_blocks(start, n_rows, fn, carry):
    """Runs carry = fn(row, block, carry) over [start, start + n_rows) in big blocks, then the tail in small ones."""
    n_big = n_rows // _BIG_BLOCK
    carry = jax.lax.fori_loop(0, n_big, lambda i, c: fn(start + i * _BIG_BLOCK, _BIG_BLOCK, c), carry)
    tail_start, tail = start + n_big * _BIG_BLOCK, n_rows - n_big * _BIG_BLOCK
    n_small = (tail + _SMALL_BLOCK - 1) // _SMALL_BLOCK
    return jax.lax.fori_loop(0, n_small, lambda i, c: fn(tail_start + i * _SMALL_BLOCK, _SMALL_BLOCK, c), carry)


def _grouped_matmul_loop(x, w, b, offsets, sizes, transpose_w: bool):
    """Returns rows of group e times w[e] (+ b[e]); x has >= _BIG_BLOCK spare rows after the last group."""
    out = jnp.zeros((x.shape[0], w.shape[1] if transpose_w else w.shape[2]), x.dtype)
    for e in range(w.shape[0]):  # groups in order: a block running past its group is rewritten by the next group
        w_e = w[e]

        def block(row, size, out):
            y = jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(x, row, size), w_e,
                                    (((1,), (1 if transpose_w else 0,)), ((), ())))
            if b is not None:
                y = y + b[e]
            return jax.lax.dynamic_update_slice_in_dim(out, y.astype(x.dtype), row, 0)

        out = _for_blocks(offsets[e], sizes[e], block, out)
    return out


def _grouped_weight_grads(x, dy, offsets, sizes):
    """Returns (dw [groups, d_in, d_out], db [groups, d_out]) = per group xᵀ·dy and Σ dy over its rows."""
    dws, dbs = [], []
    for e in range(offsets.shape[0]):
        end = offsets[e] + sizes[e]

        def block(row, size, acc):
            xb, db = jax.lax.dynamic_slice_in_dim(x, row, size), jax.lax.dynamic_slice_in_dim(dy, row, size)
            db = jnp.where((row + jnp.arange(size) < end)[:, None], db, 0)  # the tail block may hold the next group
            dw = jax.lax.dot_general(xb, db, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return acc[0] + dw, acc[1] + jnp.sum(db, axis=0, dtype=jnp.float32)

        acc = (jnp.zeros((x.shape[1], dy.shape[1]), jnp.float32), jnp.zeros((dy.shape[1],), jnp.float32))
        dw, db = _for_blocks(offsets[e], sizes[e], block, acc)
        dws.append(dw)
        dbs.append(db)
    return jnp.stack(dws), jnp.stack(dbs)


@jax.custom_vjp
def grouped_matmul(x, w, b, offsets, sizes):
    """Returns y [rows, d_out] with y[r] = x[r]·w[e] + b[e] for rows r of group e (rows offsets[e] ... + sizes[e]).

    x: [rows, d_in] with groups contiguous and at least _BIG_BLOCK spare rows after the last (their output is
    unspecified); w: [groups, d_in, d_out]; b: [groups, d_out]. A loop over row blocks: the CPU stand-in for ragged_dot.
    """
    return _grouped_matmul_loop(x, w, b, offsets, sizes, transpose_w=False)


def _grouped_matmul_fwd(x, w, b, offsets, sizes):
    return grouped_matmul(x, w, b, offsets, sizes), (x, w, offsets, sizes)


def _grouped_matmul_bwd(saved, dy):
    x, w, offsets, sizes = saved
    dx = _grouped_matmul_loop(dy, w, None, offsets, sizes, transpose_w=True)
    dw, db = _grouped_weight_grads(x, dy, offsets, sizes)
    return dx, dw.astype(w.dtype), db.astype(w.dtype), None, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sorted_rows(x, order, inverse, top_k: int):
    """Returns x[order // top_k]: the token row of each assignment in expert-sorted order (order may be padded)."""
    return x[order // top_k]


def _sorted_rows_fwd(x, order, inverse, top_k):
    return _sorted_rows(x, order, inverse, top_k), (order, inverse, x.shape[0])


def _sorted_rows_bwd(top_k, saved, g):
    order, inverse, n_tokens = saved  # a gather by the inverse permutation instead of autodiff's scatter-add
    return g[inverse].reshape(n_tokens, top_k, -1).sum(axis=1), None, None


_sorted_rows.defvjp(_sorted_rows_fwd, _sorted_rows_bwd)


@jax.custom_vjp
def _unsort_combine(y_sorted, gate, order, inverse):
    """Returns Σⱼ gate[t, j]·y_sorted[inverse[t·k + j]]: each token's gate-weighted expert outputs."""
    rows = y_sorted[inverse].reshape(*gate.shape, -1)  # [tokens, k, d]
    return jnp.einsum("tk,tkd->td", gate.astype(y_sorted.dtype), rows)


def _unsort_combine_fwd(y_sorted, gate, order, inverse):
    return _unsort_combine(y_sorted, gate, order, inverse), (y_sorted, gate, order, inverse)


def _unsort_combine_bwd(saved, g):
    y_sorted, gate, order, inverse = saved
    k = gate.shape[1]
    rows = y_sorted[inverse].reshape(*gate.shape, -1)
    d_gate = jnp.einsum("td,tkd->tk", g.astype(jnp.float32), rows.astype(jnp.float32)).astype(gate.dtype)
    real = jnp.arange(order.shape[0]) < inverse.shape[0]  # padding rows get no gradient
    scale = jnp.where(real, gate.reshape(-1)[order], 0).astype(g.dtype)
    d_y = g[order // k] * scale[:, None]
    return d_y, d_gate, None, None


_unsort_combine.defvjp(_unsort_combine_fwd, _unsort_combine_bwd)


def sort_dispatch(x, expert_index, combine_gate, experts: ExpertWeights, *, grouped: str = "auto"):
    """Returns y [tokens, d_model]: assignments sorted by expert, each expert applied to its contiguous slice.

    grouped: "loop" (grouped_matmul, for CPU), "ragged" (jax.lax.ragged_dot) or "auto" (loop on CPU, else ragged).
    Dropped assignments (combine_gate 0) are computed and then weighted by 0, so there is no data-dependent shape.
    """
    if grouped == "auto":
        grouped = "loop" if jax.default_backend() == "cpu" else "ragged"
    n_tokens, top_k = expert_index.shape
    n_experts = experts.w_up.shape[0]
    flat_expert = expert_index.reshape(-1)
    n_assign = flat_expert.shape[0]
    order = jnp.argsort(flat_expert, stable=True).astype(jnp.int32)  # sorted position -> assignment
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n_assign, dtype=jnp.int32))  # assignment -> position
    sizes = jnp.bincount(flat_expert, length=n_experts).astype(jnp.int32)
    offsets = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
    padded_order = jnp.concatenate([order, jnp.zeros((_BIG_BLOCK,), jnp.int32)])  # spare rows for the last block
    xs = _sorted_rows(x, padded_order, inverse, top_k)  # [assignments + spare, d_model]
    if grouped == "loop":
        h = nn.gelu(grouped_matmul(xs, experts.w_up, experts.b_up, offsets, sizes))
        ys = grouped_matmul(h, experts.w_down, experts.b_down, offsets, sizes)
    elif grouped == "ragged":
        row_expert = jnp.concatenate([flat_expert[order], jnp.full((_BIG_BLOCK,), n_experts - 1, jnp.int32)])
        h = nn.gelu(jax.lax.ragged_dot(xs, experts.w_up, sizes) + experts.b_up[row_expert])
        ys = jax.lax.ragged_dot(h, experts.w_down, sizes) + experts.b_down[row_expert]
    else:
        raise ValueError(f"sort_dispatch: grouped must be 'auto', 'loop' or 'ragged', got {grouped!r}")
    return _unsort_combine(ys, combine_gate, padded_order, inverse)


# -- the layer ----------------------------------------------------------------------------------------------------


def usage_stats(expert_index, keep, probs, n_experts: int) -> dict:
    """Returns routing scalars: usage entropy (1 = uniform), max expert share, dropped fraction, router confidence."""
    share = jnp.mean(jax.nn.one_hot(expert_index, n_experts), axis=(0, 1))
    entropy = -jnp.sum(share * jnp.log(jnp.maximum(share, 1e-12)))
    return {"usage_entropy": entropy / max(math.log(n_experts), 1e-12) if n_experts > 1 else jnp.ones(()),
            "max_share": jnp.max(share), "dropped_fraction": 1.0 - jnp.mean(keep.astype(jnp.float32)),
            "router_confidence": jnp.mean(jnp.max(probs, axis=-1))}


def resolve_dispatch(dispatch: str) -> str:
    """Returns "einsum" or "sort" for a configured dispatch ("auto": sort on CPU/GPU, einsum on TPU)."""
    if dispatch not in ("auto", "einsum", "sort"):
        raise ValueError(f"model.moe.dispatch must be 'auto', 'einsum' or 'sort', got {dispatch!r}")
    if dispatch == "auto":
        return "einsum" if jax.default_backend() == "tpu" else "sort"
    return dispatch


@register_ffn("moe")
class MoE(nn.Module):
    """A mixture-of-experts feed-forward layer: x [batch, length, d_model] -> y [batch, length, d_model].

    Sows weighted auxiliary losses into 'aux_loss', routing scalars into 'metrics' and per-token expert indices and
    combine weights into 'intermediates' (for routing plots). Router noise uses the 'noise' rng, in training only.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        cfg, moe = self.cfg, self.cfg.moe
        if moe.router not in ("noisy_topk", "switch"):
            raise ValueError(f"model.moe.router must be 'noisy_topk' or 'switch', got {moe.router!r}")
        if not 1 <= moe.top_k <= moe.n_experts:
            raise ValueError(f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.n_experts={moe.n_experts}")
        dtype = jnp.dtype(cfg.dtype)
        batch, length, d_model = x.shape
        if length > cfg.max_len:  # capacity is fixed per sequence of up to max_len tokens
            raise ValueError(f"MoE input length {length} exceeds model.max_len={cfg.max_len}")
        tokens = x.reshape(-1, d_model)
        router_in = tokens.astype(jnp.float32)  # the router runs in float32 whatever the compute dtype
        router_init = nn.initializers.normal(0.02)
        logits = router_in @ self.param("router", router_init, (d_model, moe.n_experts))
        if moe.router == "noisy_topk":
            # Paper: zero-initialised noise weights, i.e. noise std softplus(0) ≈ 0.69 at the start.
            noise_kernel = self.param("router_noise", nn.initializers.zeros, (d_model, moe.n_experts))
            noise = noise_std = None
            if moe.noise and not deterministic:
                noise_std = jax.nn.softplus(router_in @ noise_kernel)
                noise = jax.random.normal(self.make_rng("noise"), logits.shape)
            routing = noisy_top_k_routing(logits, noise_std, noise, top_k=moe.top_k)
            weights = {"importance": moe.importance_coef, "load": moe.load_coef, "z": moe.z_loss_coef}
        else:
            routing = switch_routing(logits, top_k=moe.top_k)
            weights = {"balance": moe.balance_coef, "z": moe.z_loss_coef}

        expert_index = routing.expert_index.reshape(batch, length, moe.top_k)
        capacity = sequence_capacity(cfg)
        slot, keep = assign_slots(expert_index, moe.n_experts, capacity)  # causal, per row
        combine_gate = jnp.where(keep, routing.gate.reshape(batch, length, moe.top_k), 0.0)

        expert_init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        params = ExpertWeights(
            self.param("w_up", expert_init, (moe.n_experts, d_model, cfg.d_ff)),
            self.param("b_up", nn.initializers.zeros, (moe.n_experts, cfg.d_ff)),
            self.param("w_down", expert_init, (moe.n_experts, cfg.d_ff, d_model)),
            self.param("b_down", nn.initializers.zeros, (moe.n_experts, d_model)))
        params = ExpertWeights(*(p.astype(dtype) for p in params))
        if resolve_dispatch(moe.dispatch) == "einsum":
            y = einsum_dispatch(x.astype(dtype), expert_index, combine_gate, slot, params, capacity)
        else:
            y = sort_dispatch(tokens.astype(dtype), routing.expert_index, combine_gate.reshape(-1, moe.top_k), params)

        for name, value in routing.losses.items():
            self.sow("metrics", f"moe_{name}_loss", value)
            if weights[name]:
                self.sow("aux_loss", f"moe_{name}", weights[name] * value)
        for name, value in usage_stats(routing.expert_index, keep.reshape(-1, moe.top_k), routing.probs,
                                       moe.n_experts).items():
            self.sow("metrics", f"moe_{name}", value)
        self.sow("intermediates", "expert_index", expert_index)
        self.sow("intermediates", "expert_gate", combine_gate)
        return y.reshape(batch, length, d_model).astype(dtype)
