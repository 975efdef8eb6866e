"""Logit lens and direct logit attribution over a cached run (toyjax.interp.run_with_cache).

Direct logit attribution splits the final residual stream into the pieces written into it (embeddings, each
layer's attention and MLP output, or each head's output) and maps each piece to the logits linearly: centred,
divided by the final LayerNorm's per-position scale *of the actual run* (as TransformerLens's apply_ln_to_stack
does with the cached scale), times its weight, through the unembedding. The pieces plus the bias term (LayerNorm
bias and unembedding bias through the unembedding) sum to the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from toyjax.interp.hooked import HookNameError, model_and_variables


def unembedding(run) -> tuple[jax.Array, jax.Array]:
    """Returns (W_U [d_model, vocab], b_U [vocab]) of a run (the transposed embedding when they are tied)."""
    model, variables = model_and_variables(run)
    params = variables["params"]
    if model.cfg.tie_embeddings:
        w_u = params["embed"]["embedding"].T
        return w_u, jnp.zeros(w_u.shape[1], w_u.dtype)
    return params["unembed"]["kernel"], params["unembed"]["bias"]


def unembed(run, resid, *, apply_ln: bool = True) -> jax.Array:
    """Returns logits [..., vocab] of residual vectors [..., d_model], through the final LayerNorm if apply_ln."""
    _, variables = model_and_variables(run)
    x = nn.LayerNorm().apply({"params": variables["params"]["ln_final"]}, resid) if apply_ln else resid
    w_u, b_u = unembedding(run)
    return x.astype(jnp.float32) @ w_u + b_u


def require(cache: dict, names: list[str], what: str) -> None:
    """Raises HookNameError naming the cache entries that `what` needs and the cache lacks."""
    missing = [name for name in names if name not in cache]
    if missing:
        raise HookNameError(f"{what} needs {', '.join(missing)} in the cache; run_with_cache(run, tokens, "
                            f"names=...) with these names (or names=None, every one)")


def logit_lens_names(run) -> list[str]:
    """Returns the cache names logit_lens reads: each layer's resid_pre and the last layer's resid_post."""
    n_layers = model_and_variables(run)[0].cfg.n_layers
    return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def logit_lens(run, cache: dict) -> jax.Array:
    """Returns logits [n_layers + 1, batch, pos, vocab] read off the residual stream before each layer and after the
    last, each through the final LayerNorm (its own normalisation) and the unembedding; the last row is the logits."""
    names = logit_lens_names(run)
    require(cache, names, "logit_lens")
    return jnp.stack([unembed(run, cache[name]) for name in names])


class LogitAttribution(NamedTuple):
    labels: list[str]  # one per component, e.g. "embed", "blocks.0.attn", "blocks.0.attn.head1", "blocks.0.attn.b_O"
    values: jax.Array  # [component, batch, pos, token]: each component's direct contribution to the logits
    bias: jax.Array  # [token]: final LayerNorm bias and unembedding bias through the unembedding


def attribution_names(run, by: str = "layer") -> list[str]:
    """Returns the cache names direct_logit_attribution(by=...) reads."""
    cfg = model_and_variables(run)[0].cfg
    names = ["hook_embed"] + (["hook_pos_embed"] if cfg.positions == "learned" else [])
    names += ["blocks.0.hook_resid_pre"] if cfg.grammar_state_embedding else []
    attention = "attn.hook_z" if by == "head" else "hook_attn_out"
    for i in range(cfg.n_layers):
        names += [f"blocks.{i}.{attention}", f"blocks.{i}.hook_mlp_out"]
    return names + [f"blocks.{cfg.n_layers - 1}.hook_resid_post"]


def residual_components(run, cache: dict, by: str = "layer") -> tuple[list[str], list[jax.Array]]:
    """Returns (labels, pieces [batch, pos, d_model]) that sum to the final residual stream.

    by="layer": embeddings, then each layer's attention output and MLP output.
    by="head": the same with each attention output split into its heads (z[:, :, h] @ W_O[h]) and its bias b_O.
    """
    if by not in ("layer", "head"):
        raise ValueError(f"by must be 'layer' or 'head', got {by!r}")
    model, variables = model_and_variables(run)
    cfg, params = model.cfg, variables["params"]
    require(cache, attribution_names(run, by), f"direct_logit_attribution(by={by!r})")
    labels, pieces = ["embed"], [cache["hook_embed"]]
    if cfg.positions == "learned":
        labels.append("pos_embed")
        pieces.append(cache["hook_pos_embed"])
    if cfg.grammar_state_embedding:  # the grammar-state embeddings have no hook point of their own
        labels.append("grammar_embed")
        pieces.append(cache["blocks.0.hook_resid_pre"] - sum(pieces))
    for i in range(cfg.n_layers):
        if by == "layer":
            labels.append(f"blocks.{i}.attn")
            pieces.append(cache[f"blocks.{i}.hook_attn_out"])
        else:
            out = params[f"block_{i}"]["attention"]["out"]  # kernel [head, d_head, d_model], bias [d_model]
            per_head = jnp.einsum("bphd,hdm->hbpm", cache[f"blocks.{i}.attn.hook_z"], out["kernel"])
            labels += [f"blocks.{i}.attn.head{h}" for h in range(per_head.shape[0])] + [f"blocks.{i}.attn.b_O"]
            pieces += list(per_head) + [jnp.broadcast_to(out["bias"], per_head.shape[1:])]
        labels.append(f"blocks.{i}.mlp")
        pieces.append(cache[f"blocks.{i}.hook_mlp_out"])
    return labels, pieces


def direct_logit_attribution(run, cache: dict, *, by: str = "layer", token_ids=None) -> LogitAttribution:
    """Returns each residual component's direct contribution to the logits (of token_ids, default every token).

    The final LayerNorm is folded in with the per-position scale of the cached run, so the contributions are linear
    in the components and values.sum(0) + bias equals the logits.
    """
    model, variables = model_and_variables(run)
    ln = variables["params"]["ln_final"]
    labels, pieces = residual_components(run, cache, by)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].astype(jnp.float32)
    scale = jnp.sqrt(jnp.var(final, axis=-1, keepdims=True) + nn.LayerNorm().epsilon)  # [batch, pos, 1]
    w_u, b_u = unembedding(run)
    if token_ids is not None:
        w_u, b_u = w_u[:, jnp.asarray(token_ids)], b_u[jnp.asarray(token_ids)]
    stack = jnp.stack(pieces).astype(jnp.float32)
    centred = stack - jnp.mean(stack, axis=-1, keepdims=True)
    values = (centred / scale * ln["scale"]) @ w_u
    return LogitAttribution(labels, values, ln["bias"] @ w_u + b_u)
