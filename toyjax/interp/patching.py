"""Activation patching: how much of a clean run's behaviour comes back when one activation of a corrupted run is
replaced by its clean value, for every layer and position (or head) at once.

    result = patch_activation(run, clean_tokens, corrupted_tokens, logit_difference(answer, wrong), "hook_resid_pre")
    result.patched     # [layer, pos] metric of each patched run
    result.recovered   # (patched - corrupted) / (clean - corrupted): 1 = the clean behaviour is back

The clean and corrupted runs are cached once. All patched runs of a layer are one vmapped run (jax.vmap, or
jax.lax.map in batches of batch_size); each starts from the corrupted run's cached residual stream at the patched
layer, so the layers below are dead code and are never computed again; a batch of patches that change nothing (the
clean value equals the corrupted one, as in a shared prefix) is not run. Position patches on a KV-cache-capable model
also skip the positions before the patch (causality; toyjax/interp/suffix_patching.py). patch_activation compiles
one program per call (and is traceable, so it also runs inside a caller's jax.jit); run_patched is the traceable
building block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from toyjax.interp.hooked import model_and_variables, run_with_cache, run_with_hooks
from toyjax.interp.suffix_patching import causal_suffix_patching_applies, decode_states, run_patched_suffix

Metric = Callable[[jax.Array], jax.Array]  # logits [batch, pos, vocab] -> scalar (or any array)

# What one patch replaces, by `index`: the clean value at one position, one head (all positions), or both. A mask
# and a select rather than x.at[...].set: under vmap a traced index would make it a batched scatter (slow on CPU).
def _patch_position(x, clean, i):
    return jnp.where((jnp.arange(x.shape[1]) == i).reshape((1, -1) + (1,) * (x.ndim - 2)), clean, x)


def _patch_head(x, clean, i):
    return jnp.where((jnp.arange(x.shape[2]) == i)[:, None], clean, x)


def _patch_position_head(x, clean, i):
    at = (jnp.arange(x.shape[1])[:, None] == i[0]) & (jnp.arange(x.shape[2])[None, :] == i[1])
    return jnp.where(at[..., None], clean, x)


_EDITS = {"position": _patch_position, "head": _patch_head, "position_head": _patch_position_head}


class PatchResult(NamedTuple):
    patched: jax.Array  # metric of each patched run: [layer, pos], [layer, head] or [layer, pos, head]
    clean: jax.Array  # metric of the clean run
    corrupted: jax.Array  # metric of the corrupted run

    @property
    def recovered(self) -> jax.Array:
        """Returns (patched - corrupted) / (clean - corrupted): 0 = no effect, 1 = the clean metric is restored."""
        return (self.patched - self.corrupted) / (self.clean - self.corrupted)


def logit_difference(answer_ids, wrong_ids, position: int = -1) -> Metric:
    """Returns a metric: mean over the batch of logit[answer] - logit[wrong] at `position` (one id per batch row)."""
    answer_ids, wrong_ids = jnp.atleast_1d(jnp.asarray(answer_ids)), jnp.atleast_1d(jnp.asarray(wrong_ids))

    def metric(logits):
        at = logits[:, position]  # [batch, vocab]
        rows = jnp.arange(at.shape[0])
        return jnp.mean(at[rows, answer_ids] - at[rows, wrong_ids])

    metric.reads_position = position  # lets patch_activation compute the logits at this position only
    return metric


def run_patched(run, corrupted_tokens, corrupted_resid, layer: int, hook: str, edit, indices, metric: Metric, *,
                batch_size: int | None = None, changed=None, unchanged=None) -> jax.Array:
    """Returns metric(logits) of one corrupted run per index (leading axis), each with hook's value x -> edit(x, i).

    corrupted_resid: the corrupted run's blocks.{layer}.hook_resid_pre; every run starts from it, so nothing below
    `layer` depends on the index (vmap computes it once; jit drops it). hook must be at `layer` or above.
    indices: an array (or tuple of arrays) with a leading axis over runs.
    changed (optional, with batch_size): a bool per index, False where the edit changes nothing; a batch of runs
    that are all False is not run and gives `unchanged` (the corrupted run's metric) for each.
    """
    start = f"blocks.{layer}.hook_resid_pre"

    def one(index):
        if hook == start:
            hooks = {start: lambda _: edit(corrupted_resid, index)}
        else:
            hooks = {start: lambda _: corrupted_resid, hook: lambda x: edit(x, index)}
        return metric(run_with_hooks(run, corrupted_tokens, hooks))

    if batch_size is None:
        return jax.vmap(one)(indices)
    if changed is None:
        return jax.lax.map(one, indices, batch_size=batch_size)
    n = len(changed)
    n_batches = -(-n // batch_size)

    def batched(x):  # [n, ...] -> [n_batches, batch_size, ...], padded by repeating the last entry
        x = jnp.concatenate([x, jnp.repeat(x[-1:], n_batches * batch_size - n, axis=0)])
        return x.reshape((n_batches, batch_size) + x.shape[1:])

    def one_batch(args):
        batch_indices, batch_changed = args
        return unless_no_ops(jnp.any(batch_changed), batch_size, unchanged, lambda: jax.vmap(one)(batch_indices))

    out = jax.lax.map(one_batch, (jax.tree.map(batched, indices), batched(jnp.asarray(changed))))
    return out.reshape((n_batches * batch_size,) + out.shape[2:])[:n]


def unless_no_ops(changed, count: int, unchanged, patched_runs) -> jax.Array:
    """Returns patched_runs() (count metrics) if `changed`, else `unchanged` (the corrupted run's metric) count times
    without running them: patches that write the value already there leave the corrupted run as it is."""
    skipped = jnp.broadcast_to(unchanged, (count,) + jnp.shape(unchanged)).astype(jnp.result_type(unchanged))
    return jax.lax.cond(changed, lambda: patched_runs().astype(skipped.dtype), lambda: skipped)


def _changed(clean, corrupted, index: str) -> jax.Array:
    """Returns per patch index whether the clean activation differs from the corrupted one where it is patched."""
    differs = clean != corrupted  # [batch, pos, ...] or [batch, pos, head, d_head]
    if index == "position":
        return jnp.any(differs, axis=tuple(i for i in range(differs.ndim) if i != 1))
    by_head = jnp.any(differs, axis=(0, 3))  # [pos, head]
    return jnp.any(by_head, axis=0) if index == "head" else by_head.reshape(-1)


def patch_activation(run, clean_tokens, corrupted_tokens, metric: Metric, activation: str = "hook_resid_pre", *,
                     index: str = "position", batch_size: int | None = 8, chunk_size: int | None = None) -> PatchResult:
    """Returns the metric with one clean activation patched into the corrupted run, for each layer × index.

    activation: a per-layer hook name after "blocks.{i}.", e.g. "hook_resid_pre", "hook_attn_out", "hook_mlp_out",
    "attn.hook_z" (each head's output before the out projection), "attn.hook_v".
    index: "position" ([layer, pos]), "head" ([layer, head], all positions of one head) or "position_head"
    ([layer, pos, head]); the head indices need a [batch, pos, head, d_head] activation.
    batch_size: patched runs per vmapped step; None = all of a layer's runs in one vmap (for GPU/TPU: on CPU a
    big batch thrashes the caches, and bench/patching.py measured 8 fastest).
    chunk_size: None (the default) = every patched run starts at position 0: one compiled copy of the model per
    layer, the fastest to compile. An integer turns on causal suffix patching (below) with chunks of that many
    positions: each chunk is one more compiled copy, so compile time grows as positions / chunk_size (on
    bench/patching.py's 128 positions: 28-66 s at 16 against 2-3.5 s), for a run time 2-4x shorter; worth it when one
    compiled call is reused for many (clean, corrupted) pairs of the same shape.

    Causal suffix patching: patching position p cannot change a causal model at positions before p, so for position
    indices of a per-position activation on a KV-cache-capable model (models/kv_cache.py) each patched run computes
    only the positions from its chunk's start on, attending to the corrupted run's cached keys and values before it
    (suffix_patching.run_patched_suffix). A metric with a `reads_position` attribute (logit_difference has one)
    promises to read the logits at that position only: positions after it are then never patched (causality gives
    the corrupted metric) and the last layer runs at that position alone. A chunk whose clean and corrupted
    activations are equal everywhere (a shared prefix) is not run: its patches are no-ops and give the corrupted
    metric.
    """
    if index not in _EDITS:
        raise ValueError(f"index must be one of {', '.join(_EDITS)}, got {index!r}")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean tokens {clean_tokens.shape} and corrupted tokens {corrupted_tokens.shape} must have "
                         "the same shape (patching pairs positions)")
    model, variables = model_and_variables(run)
    # One program per call: eager vmapped flax runs op by op, which is many times slower than compiling.
    patch = jax.jit(lambda variables, clean, corrupted: _patch_activation(
        (model, variables), clean, corrupted, metric, activation, index, batch_size, chunk_size))
    return patch(variables, clean_tokens, corrupted_tokens)


def _patch_activation(run, clean_tokens, corrupted_tokens, metric, activation, index, batch_size,
                      chunk_size) -> PatchResult:
    model = model_and_variables(run)[0]
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.{activation}" for i in range(n_layers)]
    starts = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    clean_logits, clean = run_with_cache(run, clean_tokens, names)
    corrupted_logits, corrupted = run_with_cache(run, corrupted_tokens, sorted(set(names + starts)))
    shape = clean[names[0]].shape
    if index != "position" and len(shape) != 4:
        raise ValueError(f"index={index!r} needs a per-head activation [batch, pos, head, d_head]; "
                         f"{names[0]} is {shape}")
    if chunk_size is not None and index != "head" and causal_suffix_patching_applies(model.cfg, activation):
        patched = _patch_causal_suffixes(run, clean, corrupted, corrupted_tokens, corrupted_logits, names, starts,
                                         metric, index, batch_size, chunk_size)
        return PatchResult(patched, metric(clean_logits), metric(corrupted_logits))
    n_pos, n_heads = shape[1], shape[2] if len(shape) == 4 else 0
    indices = {"position": jnp.arange(n_pos), "head": jnp.arange(n_heads),
               "position_head": tuple(jnp.indices((n_pos, n_heads)).reshape(2, -1))}[index]
    rows = []
    corrupted_metric = metric(corrupted_logits)
    for layer, name in enumerate(names):
        edit = lambda x, i, clean_value=clean[name]: _EDITS[index](x, clean_value, i)  # noqa: E731
        rows.append(run_patched(run, corrupted_tokens, corrupted[starts[layer]], layer, name, edit, indices, metric,
                                batch_size=batch_size, changed=_changed(clean[name], corrupted[name], index),
                                unchanged=corrupted_metric))
    patched = jnp.stack(rows)
    if index == "position_head":
        patched = patched.reshape(n_layers, n_pos, n_heads, *patched.shape[2:])
    return PatchResult(patched, metric(clean_logits), corrupted_metric)


def _patch_causal_suffixes(run, clean, corrupted, corrupted_tokens, corrupted_logits, names, starts, metric, index,
                           batch_size, chunk):
    """Returns patched [layer, pos] (or [layer, pos, head]) from runs over suffixes (toyjax/interp/suffix_patching)."""
    n_layers, n_pos = len(names), corrupted_tokens.shape[1]
    n_heads = clean[names[0]].shape[2] if index == "position_head" else 1
    read_position = getattr(metric, "reads_position", None)
    end = n_pos if read_position is None else read_position % n_pos + 1  # patches after `end` change nothing read
    read_position = None if read_position is None else end - 1
    chunk_starts = range(0, end, chunk)
    states = decode_states(run, corrupted_tokens, chunk_starts)
    corrupted_metric = metric(corrupted_logits)
    rows = []
    for layer, name in enumerate(names):
        def edit(x, i, offset, clean_value=clean[name]):
            part = clean_value[:, offset:offset + x.shape[1]]
            if index == "position":
                return _patch_position(x, part, i - offset)
            return _patch_position_head(x, part, (i[0] - offset, i[1]))

        pieces = []
        for start in chunk_starts:
            stop = min(start + chunk, end)
            positions = jnp.repeat(jnp.arange(start, stop), n_heads)
            indices = positions if index == "position" else (positions, jnp.arange(len(positions)) % n_heads)
            # Where the clean and corrupted activations are equal on the whole chunk (e.g. the shared prefix
            # before an edit) every patch of it is a no-op: its runs are the corrupted run, so they are not run.
            changed = jnp.any(clean[name][:, start:stop] != corrupted[name][:, start:stop])
            pieces.append(unless_no_ops(changed, len(positions), corrupted_metric, lambda start=start, indices=indices:
                                        run_patched_suffix(run, corrupted_tokens, corrupted[starts[layer]],
                                                           corrupted_logits, states[start], layer, name, edit, indices,
                                                           metric, start=start, read_position=read_position,
                                                           batch_size=batch_size)))
        unread = jnp.broadcast_to(corrupted_metric, ((n_pos - end) * n_heads,) + jnp.shape(corrupted_metric))
        rows.append(jnp.concatenate(pieces + [unread.astype(pieces[0].dtype)]))
    patched = jnp.stack(rows)
    return patched.reshape(n_layers, n_pos, n_heads, *patched.shape[2:]) if index == "position_head" else patched


def plot_patching(values, path, *, title: str = "", xlabel: str = "position", ylabel: str = "layer",
                  xticklabels=None, panel_label: str = "head") -> Path:
    """Writes a heatmap PNG of values [rows, cols] (or one panel per leading index of [panels, rows, cols]) and
    returns its path; colours are centred on 0 (red up, blue down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(values, np.float64)
    panels = values[None] if values.ndim == 2 else values
    if panels.ndim != 3:
        raise ValueError(f"plot_patching needs a 2-D or 3-D array, got shape {values.shape}")
    limit = float(np.nanmax(np.abs(panels))) or 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(1 + 3.5 * len(panels), 3.2), squeeze=False)
    for k, (ax, panel) in enumerate(zip(axes[0], panels)):
        image = ax.imshow(panel, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yticks(range(panel.shape[0]))  # layers are whole numbers
        if xticklabels is not None:
            ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=90, fontsize=7)
        if len(panels) > 1:
            ax.set_title(f"{panel_label} {k}")
    fig.colorbar(image, ax=axes[0].tolist())
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
