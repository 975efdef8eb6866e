"""Attention and routing views against brute-force numpy recomputations, and the interactive page in a browser."""

import jax
import jax.numpy as jnp
import numpy as np

from toyjax import interp
from toyjax.config import ModelConfig, MoEConfig
from toyjax.interp import views
from toyjax.models.decoder import Decoder
from toyjax.report_html import html_page


def tiny_run(**model):
    cfg = ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=8, **model)
    decoder = Decoder(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 20, (2, 7)), jnp.int32)
    params = jax.jit(decoder.init)(jax.random.key(1), tokens)["params"]
    params = jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), params)
    return (decoder, params), tokens


def brute_force_topk_pattern(q, k, top_k):
    """Returns [batch, head, query, key]: causal scores, each query's top_k visible keys softmaxed, 0 elsewhere."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, length, heads, dim = q.shape
    out = np.zeros((batch, heads, length, length))
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                scores = np.array([q[b, i, h] @ k[b, j, h] / np.sqrt(dim) for j in range(i + 1)])
                kept = np.argsort(-scores)[:top_k]
                weights = np.exp(scores[kept] - scores[kept].max())
                out[b, h, i, kept] = weights / weights.sum()
    return out


def test_topk_view_scatters_the_kept_keys():
    run, tokens = tiny_run(attention="topk", attention_top_k=3)
    _, cache = interp.run_with_cache(run, tokens, [f"blocks.{i}.attn.hook_{n}" for i in range(2) for n in "qk"])
    patterns = views.attention_patterns(run, tokens)
    assert patterns.shape == (2, 2, 2, 7, 7)
    for layer in range(2):
        want = brute_force_topk_pattern(cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"], 3)
        np.testing.assert_allclose(patterns[layer], want, atol=1e-5)


def test_dense_view_is_the_softmax_of_the_scores():
    run, tokens = tiny_run()
    _, cache = interp.run_with_cache(run, tokens, [f"blocks.{i}.attn.hook_{n}" for i in range(2) for n in "qk"])
    patterns = views.attention_patterns(run, tokens)
    for layer in range(2):  # top_k = length keeps every visible key: plain causal softmax attention
        want = brute_force_topk_pattern(cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"], 99)
        np.testing.assert_allclose(patterns[layer], want, atol=1e-5)


def test_routing_view_names_each_tokens_top_experts():
    run, tokens = tiny_run(ffn="moe", moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=0.0))
    routing = views.expert_routing(run, tokens)
    _, cache = interp.run_with_cache(run, tokens, [f"blocks.{i}.mlp.hook_router_logits" for i in range(2)])
    assert routing is not None and len(routing) == 2
    for layer, (indices, gates) in enumerate(routing):
        logits = np.asarray(cache[f"blocks.{layer}.mlp.hook_router_logits"])  # [batch, pos, experts]
        want = np.sort(np.argsort(-logits, axis=-1)[..., :2], axis=-1)
        np.testing.assert_array_equal(np.sort(indices, axis=-1), want)
        matrix = views.routing_matrix(indices[0], gates[0], 4)
        assert matrix.shape == (7, 4) and (np.count_nonzero(matrix, axis=1) <= 2).all()
        np.testing.assert_allclose(matrix.sum(1), gates[0].sum(1))
    assert views.expert_routing(tiny_run()[0], tokens) is None


def test_views_page_shows_where_a_hovered_token_attends(tmp_path, browser_page):
    run, tokens = tiny_run(ffn="moe", moe=MoEConfig(n_experts=4, top_k=2))
    patterns = views.attention_patterns(run, tokens[:1])[:, 0]
    routing = [(e[0], g[0]) for e, g in views.expert_routing(run, tokens[:1])]
    labels = [f"t{int(t)}" for t in tokens[0]]
    path = tmp_path / "views.html"
    path.write_text(html_page("views", views.views_html(labels, patterns, routing)))
    views.plot_attention(patterns, labels, tmp_path / "attention.png")
    views.plot_routing(routing, labels, 4, tmp_path / "routing.png")
    assert (tmp_path / "attention.png").stat().st_size > 1000 and (tmp_path / "routing.png").stat().st_size > 1000
    with browser_page(path) as (page, problems):
        assert page.locator("#view-heads button").count() == 4
        assert page.locator("#view-tokens .token").count() == 7
        assert page.locator("#routing tbody tr").count() == 7
        for layer, head, query in [(0, 0, 3), (1, 1, 6), (1, 0, 0)]:
            page.click(f"#view-heads button[data-layer='{layer}'][data-head='{head}']")
            page.hover(f"#view-tokens .token[data-position='{query}']")
            shown = [float(w) for w in page.eval_on_selector_all("#view-tokens .token", "s => s.map(x => x.dataset.weight)")]
            np.testing.assert_allclose(shown, patterns[layer, head, query], atol=1e-3)
            assert f"layer {layer}, head {head}" in page.inner_text("#view-status")
        first = page.inner_text("#routing tbody tr:first-child").split("\t")
        assert first[2].startswith(f"e{int(routing[0][0][0, 0])} ")
        assert problems == []


def test_attention_only_decoder_adds_nothing_after_attention():
    from toyjax.testing import tiny_config

    assert tiny_config(model={"ffn": "none"}).model.ffn == "none"  # the config accepts the registered kind
    run, tokens = tiny_run(ffn="none")
    _, cache = interp.run_with_cache(run, tokens, ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid",
                                                   "blocks.1.hook_resid_post"])
    assert not np.asarray(cache["blocks.1.hook_mlp_out"]).any()
    np.testing.assert_array_equal(cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_mid"])
    assert "ffn" not in run[1]["block_0"]  # no feed-forward parameters
