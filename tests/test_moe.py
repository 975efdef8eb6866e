import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyjax.config import ModelConfig, MoEConfig
from toyjax.models import moe as M


def numpy_gelu(x):  # flax's nn.gelu default: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def random_experts(key, n_experts, d_model, d_ff):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return M.ExpertWeights(jax.random.normal(k1, (n_experts, d_model, d_ff)) * 0.3,
                           jax.random.normal(k2, (n_experts, d_ff)) * 0.1,
                           jax.random.normal(k3, (n_experts, d_ff, d_model)) * 0.3,
                           jax.random.normal(k4, (n_experts, d_model)) * 0.1)


def brute_force_slots(expert_index, n_experts, counts_before=None):
    """The causal rule by loops: per row, positions in order, a token's choices in order; slot = expert's count so far."""
    expert_index = np.asarray(expert_index)
    batch, length, top_k = expert_index.shape
    used = np.zeros((batch, n_experts), int) if counts_before is None else np.array(counts_before, int)
    slot = np.zeros(expert_index.shape, int)
    for b in range(batch):
        for t in range(length):
            for j in range(top_k):
                e = expert_index[b, t, j]
                slot[b, t, j] = used[b, e]
                used[b, e] += 1
    return slot, used


def brute_force_keep(expert_index, n_experts, capacity):
    return brute_force_slots(expert_index, n_experts)[0] < capacity


def brute_force_keep_gshard(expert_index, n_experts, capacity):
    """GShard order by loops: first choices of all tokens of all rows in order, then second choices, ..."""
    flat = np.asarray(expert_index).reshape(-1, np.shape(expert_index)[-1])
    used, keep = [0] * n_experts, np.zeros(flat.shape, bool)
    for j in range(flat.shape[1]):
        for t in range(flat.shape[0]):
            e = flat[t, j]
            keep[t, j] = used[e] < capacity
            used[e] += 1
    return keep.reshape(np.shape(expert_index))


def crowded_expert_index(rng, batch, length, n_experts, top_k):
    expert_index = np.stack([rng.permutation(n_experts)[:top_k] for _ in range(batch * length)])
    expert_index = expert_index.reshape(batch, length, top_k)
    expert_index[:, : length // 2, 0] = 0  # crowd one expert
    return expert_index


def moe_cfg(max_len=128, **moe):
    return ModelConfig(d_model=8, d_ff=12, max_len=max_len, moe=MoEConfig(**moe))


@pytest.mark.parametrize("priority", ["causal", "gshard"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.6])
def test_dispatch_forms_agree_in_values_and_gradients(capacity_factor, priority):
    batch, length, n_experts, top_k = 3, 50, 5, 2
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (batch, length, 8))
    experts = random_experts(k2, n_experts, 8, 12)
    logits = jax.random.normal(k3, (batch * length, n_experts))
    # GShard's queue spans the batch, so its einsum form takes the batch as one group.
    groups = batch if priority == "causal" else 1
    capacity = M.expert_capacity(batch * length // groups, n_experts, top_k, capacity_factor)

    def layer(x, experts, logits, form):
        routing = M.noisy_top_k_routing(logits, top_k=top_k)
        expert_index = routing.expert_index.reshape(groups, -1, top_k)
        slot, keep = M.assign_slots(expert_index, n_experts, capacity, priority=priority)
        gate = jnp.where(keep, routing.gate.reshape(expert_index.shape), 0.0)
        if form == "einsum":
            return M.einsum_dispatch(x.reshape(groups, -1, 8), expert_index, gate, slot, experts, capacity).reshape(-1, 8)
        return M.sort_dispatch(x.reshape(-1, 8), routing.expert_index, gate.reshape(-1, top_k), experts, grouped=form)

    @jax.jit
    def values_and_grads():
        out = {}
        for form in ("einsum", "loop", "ragged"):
            grads = jax.grad(lambda *a: jnp.sum(jnp.sin(layer(*a, form))), argnums=(0, 1, 2))(x, experts, logits)
            out[form] = layer(x, experts, logits, form), grads
        return out

    out = values_and_grads()
    reference, reference_grads = out["einsum"]
    assert float(jnp.abs(reference).max()) > 0.1
    dropped = np.all(np.asarray(reference) == 0, axis=-1).mean()  # tokens whose every choice was dropped
    assert (dropped > 0) == (capacity_factor > 0)
    for form in ("loop", "ragged"):
        np.testing.assert_allclose(out[form][0], reference, atol=2e-5)
        for got, want in zip(jax.tree.leaves(out[form][1]), jax.tree.leaves(reference_grads)):
            np.testing.assert_allclose(got, want, atol=1e-4)


def test_grouped_matmul_crosses_block_boundaries():
    sizes = np.array([0, 300, 1, 33, 257])  # empty, big + tail, single row, small tail, one past a big block
    rows = int(sizes.sum())
    x = np.random.default_rng(0).normal(size=(rows + M._BIG_BLOCK, 3)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(5, 3, 4)).astype(np.float32)
    b = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    got = M.grouped_matmul(x, w, b, jnp.asarray(offsets, jnp.int32), jnp.asarray(sizes, jnp.int32))
    group = np.repeat(np.arange(5), sizes)
    want = np.einsum("rd,rdf->rf", x[:rows].astype(np.float64), w[group]) + b[group]
    np.testing.assert_allclose(got[:rows], want, atol=1e-4)


@pytest.mark.parametrize("router", ["noisy_topk", "switch"])
@pytest.mark.parametrize("dispatch", ["einsum", "sort"])
def test_one_expert_without_noise_is_the_dense_ffn(router, dispatch):
    module = M.MoE(moe_cfg(n_experts=1, top_k=1, router=router, dispatch=dispatch, noise=False))
    x = jax.random.normal(jax.random.key(0), (2, 7, 8))
    p = jax.tree.map(np.float64, module.init(jax.random.key(1), x)["params"])
    p["b_up"] = np.random.default_rng(0).normal(size=p["b_up"].shape)  # zero-initialised; make them count
    p["b_down"] = np.random.default_rng(1).normal(size=p["b_down"].shape)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    want = numpy_gelu(np.asarray(x, np.float64) @ p["w_up"][0] + p["b_up"][0]) @ p["w_down"][0] + p["b_down"][0]
    for deterministic in (True, False):
        got = jax.jit(module.apply, static_argnames="deterministic")({"params": params}, x, deterministic=deterministic)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_capacity_drops_exactly_the_overflow_assignments_in_causal_order_per_row():
    rng = np.random.default_rng(0)
    for batch, length, n_experts, top_k, capacity in [(3, 40, 4, 1, 7), (2, 64, 6, 2, 9), (1, 33, 3, 3, 30)]:
        expert_index = crowded_expert_index(rng, batch, length, n_experts, top_k)
        slot, keep = M.assign_slots(jnp.asarray(expert_index), n_experts, capacity)
        want_slot, _ = brute_force_slots(expert_index, n_experts)
        np.testing.assert_array_equal(slot, want_slot)
        np.testing.assert_array_equal(keep, want_slot < capacity)
        assert not keep.all()


def test_gshard_priority_is_kept_as_an_explicit_option():
    rng = np.random.default_rng(1)
    expert_index = crowded_expert_index(rng, 3, 20, 4, 2)
    slot, keep = M.assign_slots(jnp.asarray(expert_index), 4, 12, priority="gshard")
    want = brute_force_keep_gshard(expert_index, 4, 12)
    np.testing.assert_array_equal(keep, want)
    assert not np.array_equal(want, brute_force_keep(expert_index, 4, 12))  # the orders really differ here
    with pytest.raises(ValueError, match="priority"):
        M.assign_slots(jnp.asarray(expert_index), 4, 12, priority="random")


def test_causal_slots_carried_step_by_step_equal_the_whole_sequence():
    rng = np.random.default_rng(2)
    batch, length, n_experts, top_k = 3, 17, 5, 2
    expert_index = crowded_expert_index(rng, batch, length, n_experts, top_k)
    want_slot, want_counts = brute_force_slots(expert_index, n_experts)
    step = jax.jit(M.causal_slots)
    for chunk in (1, 4):  # one token per step (a KV-cache decoder), and a prompt fed in chunks
        counts, slots = jnp.zeros((batch, n_experts), jnp.int32), []
        for start in range(0, length, chunk):
            slot, counts = step(jnp.asarray(expert_index[:, start : start + chunk]), counts)
            slots.append(slot)
        np.testing.assert_array_equal(np.concatenate(slots, axis=1), want_slot)
        np.testing.assert_array_equal(counts, want_counts)


@pytest.mark.parametrize("dispatch", ["einsum", "sort"])
def test_switch_layer_outputs_zero_for_dropped_tokens_and_the_gated_expert_otherwise(dispatch):
    module = M.MoE(moe_cfg(max_len=16, n_experts=4, top_k=1, router="switch", capacity_factor=0.5, dispatch=dispatch))
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    params = module.init(jax.random.key(1), x)["params"]
    params["router"] = params["router"] * 100  # confident, skewed routing so that some expert overflows
    y = np.asarray(jax.jit(module.apply)({"params": params}, x), np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(x, np.float64).reshape(32, 8)
    logits = tokens @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choice = probs.argmax(-1)
    keep = brute_force_keep(choice.reshape(2, 16, 1), 4, capacity=math.ceil(0.5 * 16 / 4)).reshape(32)  # per row
    assert 0 < keep.sum() < 32
    for t in range(32):
        e = choice[t]
        expert_out = numpy_gelu(tokens[t] @ p["w_up"][e] + p["b_up"][e]) @ p["w_down"][e] + p["b_down"][e]
        want = probs[t, e] * expert_out if keep[t] else np.zeros(8)
        np.testing.assert_allclose(y.reshape(32, 8)[t], want, atol=1e-4)


def numpy_cv_squared(v):
    return np.var(v) / np.mean(v) ** 2


def numpy_normal_cdf(z):
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def numpy_noisy_top_k_losses(logits, noise_std, noise, k):
    noisy = logits + noise * noise_std
    importance, load = np.zeros(logits.shape[1]), np.zeros(logits.shape[1])
    for t in range(logits.shape[0]):
        kept = np.argsort(-noisy[t])[:k]
        gates = np.exp(noisy[t, kept] - noisy[t, kept].max())
        importance[kept] += gates / gates.sum()
        for i in range(logits.shape[1]):
            others = np.sort(np.delete(noisy[t], i))[::-1]
            load[i] += numpy_normal_cdf((logits[t, i] - others[k - 1]) / noise_std[t, i])
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    return {"importance": numpy_cv_squared(importance), "load": numpy_cv_squared(load), "z": z}


def numpy_switch_balance(logits):
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    share = np.bincount(probs.argmax(-1), minlength=logits.shape[1]) / logits.shape[0]
    return logits.shape[1] * np.sum(share * probs.mean(0))


def test_auxiliary_losses_match_a_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 6)) + np.linspace(0, 1.5, 6)
    noise_std, noise = np.log1p(np.exp(rng.normal(size=(50, 6)))), rng.normal(size=(50, 6))
    for k in (1, 2, 3):
        routing = M.noisy_top_k_routing(*(jnp.asarray(a, jnp.float32) for a in (logits, noise_std, noise)), top_k=k)
        want = numpy_noisy_top_k_losses(logits, noise_std, noise, k)
        for name in ("importance", "load", "z"):
            assert float(routing.losses[name]) == pytest.approx(want[name], rel=1e-4), (k, name)
    switch = M.switch_routing(jnp.asarray(logits, jnp.float32))
    assert float(switch.losses["balance"]) == pytest.approx(numpy_switch_balance(logits), rel=1e-5)


def test_auxiliary_losses_fall_as_routing_becomes_balanced():
    rng = np.random.default_rng(1)
    base, noise_std, noise = rng.normal(size=(200, 8)), np.full((200, 8), 0.5), rng.normal(size=(200, 8))
    previous = None
    for skew in (3.0, 1.5, 0.5, 0.0):
        logits = jnp.asarray(base + skew * np.arange(8) / 7, jnp.float32)
        noisy = M.noisy_top_k_routing(logits, jnp.asarray(noise_std, jnp.float32), jnp.asarray(noise, jnp.float32),
                                      top_k=2).losses
        now = [float(noisy["importance"]), float(noisy["load"]), float(M.switch_routing(logits).losses["balance"])]
        if previous is not None:
            assert all(a < b for a, b in zip(now, previous)), (skew, now, previous)
        previous = now
    assert previous[2] == pytest.approx(1.0, abs=0.1)  # N·Σ fᵢPᵢ is 1 when routing is uniform


def test_layer_sows_losses_metrics_and_routing_and_draws_noise_only_in_training():
    module = M.MoE(moe_cfg(n_experts=4, top_k=2))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = module.init(jax.random.key(1), x)["params"]
    y, side = jax.jit(lambda p, x: module.apply({"params": p}, x, mutable=["aux_loss", "metrics", "intermediates"]))(
        params, x)
    assert y.shape == x.shape
    assert set(side["aux_loss"]) == {"moe_importance", "moe_load", "moe_z"}
    assert {"moe_usage_entropy", "moe_dropped_fraction", "moe_router_confidence"} <= set(side["metrics"])
    assert side["intermediates"]["expert_index"][0].shape == (2, 5, 2)
    with pytest.raises(Exception, match="noise"):
        module.apply({"params": params}, x, deterministic=False)
    noisy = jax.jit(lambda key: module.apply({"params": params}, x, deterministic=False, rngs={"noise": key}))
    a, b = noisy(jax.random.key(2)), noisy(jax.random.key(3))
    assert float(jnp.abs(a - b).max()) > 0


@pytest.mark.parametrize("moe, match", [({"router": "hash"}, "model.moe.router"), ({"top_k": 5}, "model.moe.top_k"),
                                        ({"dispatch": "gather"}, "model.moe.dispatch"),
                                        ({"capacity_factor": -1.0}, "model.moe.capacity_factor")])
def test_bad_config_names_the_key(moe, match):
    module = M.MoE(moe_cfg(n_experts=4, **moe))
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), jnp.zeros((1, 3, 8)))


def test_input_longer_than_max_len_is_refused():
    module = M.MoE(moe_cfg(max_len=6, n_experts=4))
    with pytest.raises(ValueError, match="model.max_len=6"):
        module.init(jax.random.key(0), jnp.zeros((1, 7, 8)))


def test_moe_decoder_trains_end_to_end(tmp_path):
    train = pytest.importorskip("toyjax.train")
    from toyjax.testing import tiny_config

    cfg = tiny_config(train={"steps": 40, "batch_size": 8, "eval_every": 40, "checkpoint_every": 40,
                             "learning_rate": 1e-2, "log_every": 10})
    cfg.model.ffn = "moe"
    cfg.model.moe = MoEConfig(n_experts=4, top_k=2)
    result = train.run(cfg, tmp_path, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.5
    assert any("moe_usage_entropy" in key for key in train_records[-1])
    assert np.isfinite(result["loss"])
