"""Shared-prefix scoring: the log-probs of many texts that share beginnings, each shared token run through once.

The fuzzer scores texts that differ only near their end: every answer candidate of a probe repeats the probe's
prompt, and every edit of a probe repeats the prompt up to the edited word. `shared_prefix_token_log_probs`
returns exactly what `evaluate.token_log_probs` returns (same windows, same values up to float rounding) but runs
each distinct prefix through the decoder once, using the KV cache (models/kv_cache.py):

  1. every sequence is cut into evaluate.window_plan's windows (a window is a sequence of its own to the model);
  2. the windows' inputs form a compressed trie (`prefix_forest`): a node is a window input or a point where two
     inputs part (the longest common prefix of neighbours in sorted order), its parent the longest other node it
     extends; where a node's tokens padded to a power of two would pass max_len, its first power-of-two tokens
     become a node of their own (`fit_calls`);
  3. depth by depth, each node's own tokens (after its parent's) go through one decode-mode call that continues
     its parent's cache; nodes of a depth are batched, padded to a power-of-two length (few compiled shapes);
  4. a token's log-prob is read at the node holding the position before it (the last position of a node is
     read per child, from that position's whole log-softmax row).

Padding tokens after a node's own tokens are harmless to the keys and values of its real tokens (causal) but
would count in an MoE layer's per-row expert counts (kept in the cache); the call therefore recounts them over
the real tokens alone (`cache_after_real_tokens`). Where the decoder has no KV-cache form, carries a grammar, or
is not a toyjax Decoder, the plain path (`evaluate.token_log_probs`) is used.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from toyjax import evaluate
from toyjax.data.run_data import run_grammar
from toyjax.models.decoder import Decoder
from toyjax.models.kv_cache import init_cache, kv_cache_unsupported_reason
from toyjax.models.moe import causal_slots
from toyjax.runs import Run

# Distinct window inputs per forest: bounds the caches held at once (a row of cache is
# n_layers x 2 x max_len x d_model floats, 0.5 MB for a 4 x 128 decoder at max_len 128).
INPUTS_PER_FOREST = 512
MAX_ROWS_PER_CALL = 64
MIN_ROWS_PER_CALL = 4  # fewer compiled shapes (each costs seconds for an MoE) for a few padding rows


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_forest(inputs: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[int, ...] | None]:
    """Returns {node: parent node or None}: the compressed trie of the inputs (non-empty token tuples).

    Nodes are the inputs and every longest common prefix of two inputs adjacent in sorted order (every point
    where inputs part); a node's parent is the longest other node it starts with, so each token of the inputs
    belongs to exactly one node.
    """
    ordered = sorted(set(inputs))
    nodes = set(ordered)
    for a, b in zip(ordered, ordered[1:]):
        shared = common_prefix_length(a, b)
        if shared:
            nodes.add(a[:shared])
    parent, ancestors = {}, []
    for node in sorted(nodes):  # a prefix sorts before its extensions: a stack walk finds each node's parent
        while ancestors and node[:len(ancestors[-1])] != ancestors[-1]:
            ancestors.pop()
        parent[node] = ancestors[-1] if ancestors else None
        ancestors.append(node)
    return parent


def fit_calls(parent: dict, max_len: int) -> dict:
    """Returns the forest with nodes inserted where a node's tokens, padded to a power of two, would pass max_len.

    A node of n tokens after position `start` is fed in one call of the next power of two >= n tokens; where that
    passes max_len, its first 2^floor(log2 n) tokens become a node of their own (one call, no padding), and so on.
    """
    out = dict(parent)
    for node, up in parent.items():
        start = 0 if up is None else len(up)
        while start + call_length(len(node) - start) > max_len:
            middle = node[:start + (1 << ((len(node) - start).bit_length() - 1))]
            out.setdefault(middle, up)
            up, start = middle, len(middle)
        out[node] = up
    return out


def call_length(n: int) -> int:
    """Returns the padded length of a call feeding n tokens: the next power of two (few compiled shapes)."""
    return 1 << (n - 1).bit_length()


def cache_after_real_tokens(before: Mapping, after: Mapping, intermediates: Mapping, real_length):
    """Returns the cache `after` a decode call as if each row had been fed only its first real_length[row] tokens.

    next_position advances by the real length; an MoE layer's expert counts (models/moe.py) are recounted from
    `before` over the real tokens' expert choices (the layer's sown expert_index). Keys and values written for
    padding positions stay: they sit after the real ones and the next call overwrites them.
    """
    length = None

    def recount(before, after, sown):
        nonlocal length
        out = dict(after)
        for key, value in after.items():
            if key == "expert_counts":
                expert_index = sown["expert_index"][0]  # [rows, n, top_k]
                real = jnp.arange(expert_index.shape[1])[None, :, None] < real_length[:, None, None]
                out[key] = causal_slots(jnp.where(real, expert_index, -1), before[key])[1]  # -1: counted nowhere
            elif isinstance(value, Mapping):
                out[key] = recount(before[key], value, sown.get(key, {}))
        return out

    out = recount(before, after, intermediates)
    out["next_position"] = before["next_position"] + real_length
    return out


@functools.partial(jax.jit, static_argnames=("model",))
def extend_prefixes(model: Decoder, params, cache, tokens, real_length):
    """Returns (log-probs of each row's next token [rows, n - 1], log-softmax at its last real position
    [rows, vocab], the cache after its real tokens) for tokens [rows, n] continuing each row of `cache`."""
    logits, variables = model.apply({"params": params, "cache": cache}, tokens, decode=True,
                                    mutable=["cache", "intermediates"])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    inside = jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    last = jnp.take_along_axis(log_probs, (real_length - 1)[:, None, None], axis=1)[:, 0]
    return inside, last, cache_after_real_tokens(cache, variables["cache"], variables.get("intermediates", {}),
                                                 real_length)


@functools.lru_cache(maxsize=32)
def zero_cache(model: Decoder, rows: int, length: int):
    """Returns init_cache(model, rows, length), made once per shape (its decode-mode trace costs a model init)."""
    return init_cache(model, rows, length)


def plain_path_reason(run: Run) -> str | None:
    """Returns why a run's texts are scored by the plain path instead of shared prefixes, or None."""
    if not isinstance(run.model, Decoder):
        return "the model is not a toyjax Decoder"
    if run_grammar(run.config, run.tokenizer) is not None:
        return "the run's data has a grammar (grammar states feed the model)"
    return kv_cache_unsupported_reason(run.config.model)


def _forest_log_probs(run: Run, parent: dict, pad_id: int, batch_size: int) -> dict:
    """Returns {node: (inside log-probs [len - parent's len - 1], last position's log-softmax [vocab])}."""
    model, max_len = run.model, run.config.model.max_len
    depth: dict = {}
    for node in sorted(parent, key=len):  # a parent is shorter than its children: its depth is known first
        depth[node] = 0 if parent[node] is None else depth[parent[node]] + 1
    has_children = {p for p in parent.values() if p is not None}
    results, cache_rows, level_cache = {}, {}, None
    at_depth: dict[int, list] = {}
    for node in parent:
        at_depth.setdefault(depth[node], []).append(node)
    for d in range(len(at_depth)):
        nodes = at_depth[d]
        by_length: dict[int, list] = {}
        for node in nodes:
            start = 0 if parent[node] is None else len(parent[node])
            by_length.setdefault(call_length(len(node) - start), []).append(node)
        outputs, row_of = [], {}
        for length, group in sorted(by_length.items()):
            max_rows = max(1, min(MAX_ROWS_PER_CALL, batch_size * max_len // length))
            for first in range(0, len(group), max_rows):
                chunk = group[first:first + max_rows]
                rows = min(max(1 << (len(chunk) - 1).bit_length(), MIN_ROWS_PER_CALL), max_rows)
                tokens = np.full((rows, length), pad_id, np.int32)
                real = np.ones(rows, np.int32)
                parents = np.zeros(rows, np.int32)
                for r, node in enumerate(chunk):
                    start = 0 if parent[node] is None else len(parent[node])
                    tokens[r, :len(node) - start] = node[start:]
                    real[r] = len(node) - start
                    parents[r] = 0 if parent[node] is None else cache_rows[parent[node]]
                if d == 0:
                    cache = zero_cache(model, rows, max_len)
                else:
                    cache = jax.tree.map(lambda c: jnp.take(c, jnp.asarray(parents), axis=0), level_cache)
                inside, last, after = extend_prefixes(model, run.params, cache, jnp.asarray(tokens), jnp.asarray(real))
                inside, last = np.asarray(inside, np.float64), np.asarray(last, np.float64)
                for r, node in enumerate(chunk):
                    results[node] = (inside[r, :real[r] - 1], last[r])
                if any(node in has_children for node in chunk):
                    offset = sum(len(jax.tree.leaves(o)[0]) for o in outputs)
                    row_of.update({node: offset + r for r, node in enumerate(chunk)})
                    outputs.append(after)
        level_cache = jax.tree.map(lambda *c: jnp.concatenate(c), *outputs) if outputs else None
        cache_rows = row_of
    return results


def shared_prefix_token_log_probs(run: Run, sequences: Sequence[Sequence[int]], *, batch_size: int = 32,
                                  stride: int | None = None) -> list[np.ndarray]:
    """Returns evaluate.token_log_probs(run, sequences): per sequence the log-prob (nats) of each token after the
    first, computing every window prefix the sequences share once (see the module doc)."""
    if plain_path_reason(run) is not None:
        return evaluate.token_log_probs(run, sequences, batch_size=batch_size, stride=stride)
    max_len = run.config.model.max_len
    stride = stride or max(max_len // 2, 1)
    windows = []  # (sequence, begin, first scored, end)
    sequences = [tuple(int(t) for t in seq) for seq in sequences]
    for index, seq in enumerate(sequences):
        if len(seq) < 2:
            raise ValueError("a sequence to score needs at least two tokens (a context token and a target)")
        windows += [(index, begin, first, end) for begin, end, first in evaluate.window_plan(len(seq) - 1, max_len, stride)]
    inputs = sorted({sequences[i][begin:end] for i, begin, _, end in windows})
    forests, block_of = [], {}  # per block of inputs: (forest, {node: (inside, last)})
    for first in range(0, len(inputs), INPUTS_PER_FOREST):  # sorted, so a block keeps most shared prefixes together
        block = inputs[first:first + INPUTS_PER_FOREST]
        forest = fit_calls(prefix_forest(block), max_len)
        forests.append((forest, _forest_log_probs(run, forest, run.tokenizer.pad_id, batch_size)))
        block_of.update(dict.fromkeys(block, len(forests) - 1))
    out = [np.zeros(len(seq) - 1, np.float64) for seq in sequences]
    for index, begin, first, end in windows:
        seq = sequences[index]
        node = seq[begin:end]
        forest, results = forests[block_of[node]]
        window_log_probs = np.zeros(end - begin)
        while node is not None:  # from the window's own node up through its ancestors
            start = 0 if forest[node] is None else len(forest[node])
            inside, last = results[node]
            window_log_probs[start:len(node) - 1] = inside
            window_log_probs[len(node) - 1] = last[seq[begin + len(node)]]  # the token after the node, per window
            node = forest[node]
        out[index][first:end] = window_log_probs[first - begin:]
    return out
