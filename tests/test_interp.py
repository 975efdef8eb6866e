"""Cached and hooked runs, logit lens and direct logit attribution against a float64 numpy forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyjax import interp
from toyjax.config import ModelConfig, MoEConfig
from toyjax.models.decoder import Decoder

LN_EPS = 1e-6  # flax.linen.LayerNorm's default


def tiny_run(tie_embeddings=True, **model):
    cfg = ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=8,
                      tie_embeddings=tie_embeddings, **model)
    decoder = Decoder(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 20, (2, 6)), jnp.int32)
    params = jax.jit(decoder.init)(jax.random.key(1), tokens)["params"]
    # Non-trivial LayerNorm and bias parameters, so a wrong scale or a forgotten bias shows.
    params = jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype), params)
    return (decoder, params), tokens


def layer_norm(x, p):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + LN_EPS) * p["scale"] + p["bias"]


def gelu(x):  # flax's nn.gelu is the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def numpy_forward(run, tokens, edits=None):
    """Returns (logits, {hook name: activation}) of a dense learned-position decoder in float64, with edits applied."""
    model, params = run
    cfg, p = model.cfg, jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens, edits, acts = np.asarray(tokens), edits or {}, {}

    def point(name, x):
        acts[name] = edits[name](x) if name in edits else x
        return acts[name]

    x = point("hook_embed", p["embed"]["embedding"][tokens])
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    x = x + point("hook_pos_embed", p["position"]["embedding"][positions])
    for i in range(cfg.n_layers):
        b, pre = p[f"block_{i}"], f"blocks.{i}."
        x = point(pre + "hook_resid_pre", x)
        qkv = np.einsum("bld,dthe->blthe", layer_norm(x, b["ln_attention"]), b["attention"]["qkv"]["kernel"])
        qkv = qkv + b["attention"]["qkv"]["bias"]
        q, k, v = (point(pre + f"attn.hook_{n}", qkv[:, :, j]) for j, n in enumerate("qkv"))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        causal = np.tril(np.ones(scores.shape[-2:], bool))
        scores = point(pre + "attn.hook_attn_scores", np.where(causal, scores, -np.inf))
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        pattern = point(pre + "attn.hook_pattern", pattern / pattern.sum(-1, keepdims=True))
        z = point(pre + "attn.hook_z", np.einsum("bhqk,bkhd->bqhd", pattern, v))
        attn_out = np.einsum("bqhd,hdm->bqm", z, b["attention"]["out"]["kernel"]) + b["attention"]["out"]["bias"]
        x = point(pre + "hook_resid_mid", x + point(pre + "hook_attn_out", attn_out))
        h = point(pre + "mlp.hook_pre", layer_norm(x, b["ln_ffn"]) @ b["ffn"]["up"]["kernel"] + b["ffn"]["up"]["bias"])
        h = point(pre + "mlp.hook_post", gelu(h))
        mlp_out = point(pre + "hook_mlp_out", h @ b["ffn"]["down"]["kernel"] + b["ffn"]["down"]["bias"])
        x = point(pre + "hook_resid_post", x + mlp_out)
    x = point("ln_final.hook_normalized", layer_norm(x, p["ln_final"]))
    if cfg.tie_embeddings:
        return x @ p["embed"]["embedding"].T, acts
    return x @ p["unembed"]["kernel"] + p["unembed"]["bias"], acts


def test_cache_equals_float64_numpy_forward():
    run, tokens = tiny_run()
    logits, cache = jax.jit(lambda params, t: interp.run_with_cache((run[0], params), t))(run[1], tokens)
    want_logits, want = numpy_forward(run, tokens)
    assert set(cache) == set(want)
    for name in want:
        np.testing.assert_allclose(cache[name], want[name], atol=2e-5, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=1e-4)


def expected_names(n_layers, attention, ffn, positions):
    """Builds the hook name list of a decoder kind from the documented table, independently of the model code."""
    names = ["hook_embed"] + (["hook_pos_embed"] if positions == "learned" else [])
    for i in range(n_layers):
        attn = ["q", "k", "v"] + (["rot_q", "rot_k"] if positions == "rotary" else [])
        attn += ["attn_scores", "pattern"] if attention == "dense" else ["topk_indices", "topk_weights"]
        mlp = ["pre", "post"] if ffn == "dense" else ["router_logits", "expert_indices", "expert_gates"]
        names += ([f"blocks.{i}.hook_resid_pre"] + [f"blocks.{i}.attn.hook_{n}" for n in attn + ["z"]]
                  + [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_resid_mid"]
                  + [f"blocks.{i}.mlp.hook_{n}" for n in mlp]
                  + [f"blocks.{i}.hook_mlp_out", f"blocks.{i}.hook_resid_post"])
    return names + ["ln_final.hook_normalized"]


@pytest.mark.parametrize("attention,ffn,positions", [("dense", "dense", "learned"), ("topk", "dense", "rotary"),
                                                     ("dense", "moe", "learned")])
def test_hook_names_for_each_model_kind(attention, ffn, positions):
    run, tokens = tiny_run(attention=attention, attention_top_k=2, ffn=ffn, positions=positions,
                           moe=MoEConfig(n_experts=4, top_k=2, dispatch="einsum"))
    assert interp.hook_names(run) == expected_names(2, attention, ffn, positions)
    _, cache = interp.run_with_cache(run, tokens)
    assert list(cache) == expected_names(2, attention, ffn, positions)


def test_only_requested_names_are_cached_and_layouts_follow_transformer_lens():
    run, tokens = tiny_run(attention="topk", attention_top_k=3, ffn="moe",
                           moe=MoEConfig(n_experts=4, top_k=2, dispatch="einsum"))
    names = ["blocks.1.attn.hook_q", "blocks.0.attn.hook_topk_indices", "blocks.1.mlp.hook_router_logits",
             "blocks.1.mlp.hook_expert_indices"]
    _, cache = interp.run_with_cache(run, tokens, names)
    assert set(cache) == set(names)
    assert cache["blocks.1.attn.hook_q"].shape == (2, 6, 2, 8)  # [batch, pos, head, d_head]
    assert cache["blocks.0.attn.hook_topk_indices"].shape == (2, 2, 6, 3)  # [batch, head, query, top_k]
    assert cache["blocks.1.mlp.hook_router_logits"].shape == (2, 6, 4)  # [batch, pos, experts]
    # Top-k keys are never in the future; the chosen experts are the router's top 2.
    indices = np.asarray(cache["blocks.0.attn.hook_topk_indices"])
    assert (indices <= np.arange(6)[None, None, :, None]).all()
    top2 = np.argsort(-np.asarray(cache["blocks.1.mlp.hook_router_logits"]), axis=-1)[..., :2]
    np.testing.assert_array_equal(np.sort(cache["blocks.1.mlp.hook_expert_indices"], -1), np.sort(top2, -1))


def test_unknown_names_and_bad_hooks_are_errors_naming_the_nearest_name():
    run, tokens = tiny_run()
    with pytest.raises(interp.HookNameError, match=r"unknown cache name 'blocks.0.attn.hook_patern'.*"
                                                    r"did you mean 'blocks.0.attn.hook_pattern'"):
        interp.run_with_cache(run, tokens, ["blocks.0.attn.hook_patern"])
    with pytest.raises(interp.HookNameError, match=r"unknown hook name 'blocks.2.hook_resid_pre'.*"
                                                    r"'blocks.[01].hook_resid_pre'"):
        interp.run_with_hooks(run, tokens, {"blocks.2.hook_resid_pre": lambda x: x})
    with pytest.raises(interp.HookNameError, match=r"returned shape \(2, 6\)"):
        interp.run_with_hooks(run, tokens, {"blocks.0.hook_resid_pre": lambda x: x[..., 0]})
    topk_run, _ = tiny_run(attention="topk", attention_top_k=2)
    with pytest.raises(interp.HookNameError, match="can be cached but not hooked"):
        interp.run_with_hooks(topk_run, tokens, {"blocks.0.attn.hook_topk_weights": lambda w: w * 0})


def test_hooks_change_the_output_exactly_as_the_same_edit_in_numpy():
    run, tokens = tiny_run()
    replacement = np.asarray(jax.random.normal(jax.random.key(5), (2, 6, 16)))

    def replace_position_4(x):  # the same edit on jax (hooked run) and numpy (reference) arrays
        return (jnp if isinstance(x, jax.Array) else np).where(np.arange(6)[None, :, None] == 4, replacement, x)

    edits = {
        "blocks.0.attn.hook_pattern": lambda p: p * np.array([1.0, 0.0])[:, None, None],  # silence head 1
        "blocks.0.mlp.hook_post": lambda h: 2.0 * h,
        "blocks.1.hook_resid_pre": replace_position_4,
        "blocks.1.attn.hook_z": lambda z: z * np.array([0.0, 1.0])[:, None],  # ablate head 0's output
    }
    logits, cache = interp.run_with_cache(run, tokens, ["blocks.1.hook_resid_pre"], hooks=edits)
    want_logits, want = numpy_forward(run, tokens, edits)
    np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(cache["blocks.1.hook_resid_pre"], want["blocks.1.hook_resid_pre"], atol=2e-5)
    plain = interp.run_with_hooks(run, tokens, {})
    assert np.abs(np.asarray(plain - logits)).max() > 1e-2  # the edits did something
    # An array replaces the activation outright.
    replaced = interp.run_with_hooks(run, tokens, {"blocks.1.hook_resid_pre": jnp.asarray(replacement)})
    want_replaced, _ = numpy_forward(run, tokens, {"blocks.1.hook_resid_pre": lambda x: replacement})
    np.testing.assert_allclose(replaced, want_replaced, atol=2e-5, rtol=1e-4)


def test_moe_hooks_reach_the_routing():
    run, tokens = tiny_run(ffn="moe", moe=MoEConfig(n_experts=4, top_k=1, capacity_factor=0.0,
                                                    dispatch="einsum"))
    _, plain = interp.run_with_cache(run, tokens, ["blocks.0.hook_mlp_out", "blocks.0.mlp.hook_expert_gates"])
    assert np.abs(np.asarray(plain["blocks.0.hook_mlp_out"])).max() > 1e-3
    # Zero gates: the layer adds nothing to the residual stream.
    _, gated = interp.run_with_cache(run, tokens, ["blocks.0.hook_mlp_out"],
                                     hooks={"blocks.0.mlp.hook_expert_gates": lambda g: g * 0})
    np.testing.assert_array_equal(gated["blocks.0.hook_mlp_out"], 0.0)
    # Router logits that favour expert 3 everywhere send every token there.
    _, routed = interp.run_with_cache(run, tokens, ["blocks.1.mlp.hook_expert_indices"],
                                      hooks={"blocks.1.mlp.hook_router_logits": lambda l: l.at[..., 3].add(100.0)})
    np.testing.assert_array_equal(routed["blocks.1.mlp.hook_expert_indices"], 3)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_logit_lens_ends_at_the_logits_and_starts_at_the_embeddings(tie_embeddings):
    run, tokens = tiny_run(tie_embeddings=tie_embeddings)
    logits, cache = interp.run_with_cache(run, tokens, interp.logit_lens_names(run))
    lens = interp.logit_lens(run, cache)
    assert lens.shape == (3, 2, 6, 20)
    np.testing.assert_allclose(lens[-1], logits, atol=1e-5)
    _, acts = numpy_forward(run, tokens)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), run[1])
    w_u, b_u = ((p["embed"]["embedding"].T, 0.0) if tie_embeddings else (p["unembed"]["kernel"], p["unembed"]["bias"]))
    np.testing.assert_allclose(lens[0], layer_norm(acts["blocks.0.hook_resid_pre"], p["ln_final"]) @ w_u + b_u,
                               atol=2e-5, rtol=1e-4)
    with pytest.raises(interp.HookNameError, match="logit_lens needs blocks.1.hook_resid_pre"):
        interp.logit_lens(run, {k: v for k, v in cache.items() if k != "blocks.1.hook_resid_pre"})


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_direct_logit_attribution_sums_to_the_logits(tie_embeddings):
    run, tokens = tiny_run(tie_embeddings=tie_embeddings)
    logits, cache = interp.run_with_cache(run, tokens, interp.attribution_names(run, "head")
                                          + interp.attribution_names(run, "layer"))
    by_layer = interp.direct_logit_attribution(run, cache, by="layer")
    by_head = interp.direct_logit_attribution(run, cache, by="head", token_ids=[3, 7])
    np.testing.assert_allclose(by_layer.values.sum(0) + by_layer.bias, logits, atol=1e-4)
    np.testing.assert_allclose(by_head.values.sum(0) + by_head.bias, np.asarray(logits)[..., [3, 7]], atol=1e-4)
    # Each layer's heads plus its out-projection bias are that layer's attention contribution (numpy, float64).
    _, acts = numpy_forward(run, tokens)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), run[1])
    final = acts["blocks.1.hook_resid_post"]
    scale = np.sqrt(final.var(-1, keepdims=True) + LN_EPS)
    w_u = p["embed"]["embedding"].T if tie_embeddings else p["unembed"]["kernel"]
    for i in range(2):
        attn = acts[f"blocks.{i}.hook_attn_out"]
        want = ((attn - attn.mean(-1, keepdims=True)) / scale * p["ln_final"]["scale"]) @ w_u
        np.testing.assert_allclose(by_layer.values[by_layer.labels.index(f"blocks.{i}.attn")], want, atol=2e-5)
        rows = [by_head.labels.index(f"blocks.{i}.attn.{part}") for part in ("head0", "head1", "b_O")]
        np.testing.assert_allclose(np.asarray(by_head.values)[rows].sum(0), want[..., [3, 7]], atol=2e-5)
