"""Runs a toyjax decoder with named activations cached or rewritten, under TransformerLens's names and layouts.

    logits, cache = run_with_cache(run, tokens, names=["blocks.0.attn.hook_pattern"])
    logits = run_with_hooks(run, tokens, {"blocks.1.hook_resid_pre": lambda x: x.at[:, 3].set(0.0)})

`run` is a toyjax.runs.Run or a (model, params) pair. The names are those of the HookPoints placed in the model
(toyjax/models/hooks.py), translated from flax module paths: block_3/attention/hook_q -> blocks.3.attn.hook_q.

    hook_embed, hook_pos_embed (learned positions)                        [batch, pos, d_model]
    blocks.{i}.hook_resid_pre | hook_resid_mid | hook_resid_post          [batch, pos, d_model]
    blocks.{i}.attn.hook_q | hook_k | hook_v | hook_z                     [batch, pos, head, d_head]
    blocks.{i}.attn.hook_rot_q | hook_rot_k (rotary positions)            [batch, pos, head, d_head]
    blocks.{i}.attn.hook_attn_scores | hook_pattern (dense attention)     [batch, head, query, key]
    blocks.{i}.attn.hook_topk_indices | hook_topk_weights (top-k, read-only)   [batch, head, query, top_k]
    blocks.{i}.hook_attn_out, blocks.{i}.hook_mlp_out                     [batch, pos, d_model]
    blocks.{i}.mlp.hook_pre | hook_post (dense feed-forward)              [batch, pos, d_mlp]
    blocks.{i}.mlp.hook_router_logits (MoE)                               [batch, pos, experts]
    blocks.{i}.mlp.hook_expert_indices | hook_expert_gates (MoE)          [batch, pos, top_k]  (gates after capacity)
    ln_final.hook_normalized                                              [batch, pos, d_model]

Only the requested names are kept (capture_intermediates filtered by name), hooks go through
nn.intercept_methods, and both functions are pure and traceable: wrap them in jax.jit / jax.vmap as you like.
A cache or hook name the model does not have is an error naming the nearest one it has.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from toyjax.models.hooks import HookPoint

Hook = Callable[[jax.Array], jax.Array] | jax.Array  # an edit of the activation, or its replacement

_PART_NAMES = {"attention": "attn", "ffn": "mlp", "ln_final_hook_normalized": "ln_final.hook_normalized"}


class HookNameError(ValueError):
    """A cache or hook name that the model does not have, or a hook on a read-only point."""


def hook_name(path: Iterable[str]) -> str:
    """Returns the TransformerLens-style name of the HookPoint at a flax module path (block_0/attention/hook_q ->
    blocks.0.attn.hook_q)."""
    parts = []
    for part in path:
        block = re.fullmatch(r"block_(\d+)", part)
        parts.append(f"blocks.{block.group(1)}" if block else _PART_NAMES.get(part, part))
    return ".".join(parts)


def model_and_variables(run) -> tuple[nn.Module, dict]:
    """Returns (model, {"params": ...}) from a Run or a (model, params) pair; params may already hold "params"."""
    model, params = (run.model, run.params) if hasattr(run, "model") else run
    return model, (params if "params" in params else {"params": params})


def _nearest_error(wanted: str, valid: list[str], what: str) -> HookNameError:
    nearest = difflib.get_close_matches(wanted, valid, n=1, cutoff=0.0)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    return HookNameError(f"unknown {what} name {wanted!r} for this model{hint} "
                         f"(toyjax.interp.hook_names(run) lists all {len(valid)})")


def _apply_hook(name: str, hook: Hook, x):
    out = jnp.asarray(hook(x) if callable(hook) else hook)
    if out.shape != x.shape:
        raise HookNameError(f"the hook on {name!r} returned shape {out.shape}; the activation is {x.shape}")
    return out.astype(x.dtype)


def _forward(run, tokens, names, hooks: Mapping[str, Hook], model_kwargs):
    """Returns (logits, cache, {name: editable} of every HookPoint passed, in forward order)."""
    model, variables = model_and_variables(run)
    names = None if names is None else tuple(names)
    seen: dict[str, bool] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, HookPoint) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = hook_name(module.path)
        seen[name] = module.editable
        x = next_fun(*args, **kwargs)
        if name not in hooks:
            return x
        if not module.editable:
            raise HookNameError(f"{name!r} can be cached but not hooked: it is read out of a fused computation, "
                                "so rewriting it could not change the output")
        return _apply_hook(name, hooks[name], x)

    def wanted(module, method_name):
        return (isinstance(module, HookPoint) and method_name == "__call__"
                and (names is None or hook_name(module.path) in names))

    with nn.intercept_methods(interceptor):
        if names == ():
            logits, state = model.apply(variables, tokens, **model_kwargs), {}
        else:
            logits, state = model.apply(variables, tokens, capture_intermediates=wanted, mutable=["intermediates"],
                                        **model_kwargs)
    for name in (*(names or ()), *hooks):
        if name not in seen:
            raise _nearest_error(name, list(seen), "hook" if name in hooks else "cache")
    captured = traverse_util.flatten_dict(dict(state.get("intermediates", {})))
    by_name = {hook_name(path[:-1]): values[0] for path, values in captured.items() if path[-1] == "__call__"}
    cache = {name: by_name[name] for name in seen if name in by_name}  # forward order
    return logits, cache, seen


def run_with_cache(run, tokens, names: Iterable[str] | None = None, *, hooks: Mapping[str, Hook] | None = None,
                   **model_kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (logits, {name: activation}) for the requested names (None = every hook point), in forward order.

    hooks: as in run_with_hooks; the cache then holds the hooked values. model_kwargs go to the model
    (e.g. state_features for a grammar-state model).
    """
    logits, cache, _ = _forward(run, tokens, names, dict(hooks or {}), model_kwargs)
    return logits, cache


def run_with_hooks(run, tokens, hooks: Mapping[str, Hook], **model_kwargs: Any) -> jax.Array:
    """Returns the logits of a run in which each named activation x is replaced by hook(x) (or by the array given).

    A hook must return x's shape; it may close over traced values (positions, clean activations), so a vmapped
    set of hooked runs is one jitted program (see toyjax.interp.patching).
    """
    logits, _, _ = _forward(run, tokens, (), dict(hooks), model_kwargs)
    return logits


def hook_names(run, tokens=None, **model_kwargs: Any) -> list[str]:
    """Returns every hook point name of the model, in forward order (traced abstractly: nothing is computed)."""
    tokens = jnp.zeros((1, 1), jnp.int32) if tokens is None else tokens
    names: list[str] = []

    def trace(variables, tokens):
        names[:] = list(_forward((model_and_variables(run)[0], variables), tokens, (), {}, model_kwargs)[2])

    jax.eval_shape(trace, model_and_variables(run)[1], tokens)
    return names
