"""Jitted sampling from a decoder: greedy, temperature, top-k, top-p, optionally restricted by a grammar.

The whole loop runs inside one jit (lax.fori_loop over positions), in one of two ways:
  "cache"  KV-cache decoding (models/kv_cache.py): the prompt tokens all rows share go in one decoder call, then one
           decoder step per position, attending to the cached keys: O(length) work per token.
  "rerun"  the reference: every position re-runs the decoder on the whole fixed-size buffer, O(length²) per token;
           it works for every attention and feed-forward kind.
Rows may have prompts of different lengths: a row keeps feeding its prompt while the others already sample.
Reproducible: the same key gives the same samples, and both methods draw the same random numbers in the same order.
"""

from __future__ import annotations

import functools

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from toyjax.grammar import advance, constrain_logits
from toyjax.models.decoder import Decoder
from toyjax.models.kv_cache import init_cache, kv_cache_unsupported_reason


class SamplingError(ValueError):
    """A sampling setting (count, length, temperature, top-k, top-p) that cannot be used."""


def check_sampling_settings(*, n: int, temperature: float, top_k: int, top_p: float) -> None:
    """Returns None if the settings are usable; raises SamplingError naming the first that is not."""
    if n < 1:
        raise SamplingError(f"sample: n={n} must be >= 1 (the number of samples)")
    if not temperature > 0:
        raise SamplingError(f"sample: temperature={temperature} must be > 0 (use greedy decoding for the argmax)")
    if top_k < 0:
        raise SamplingError(f"sample: top_k={top_k} must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise SamplingError(f"sample: top_p={top_p} must be in (0, 1] (1 keeps every token)")


def check_sample_length(prompt_length: int, length: int, max_len: int) -> None:
    """Returns None if `length` tokens hold the prompt and one more token within max_len; else raises SamplingError."""
    if prompt_length < 1:
        raise SamplingError("sample: needs a non-empty prompt (e.g. [tokenizer.eos_id])")
    if not prompt_length < length <= max_len:
        raise SamplingError(f"sample: length={length} must be more than the prompt's {prompt_length} tokens and at "
                            f"most model.max_len={max_len}")


def filter_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Returns logits [..., vocab] scaled by 1/temperature with everything outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


class SamplingOptions(NamedTuple):
    """How each new token is chosen (static under jit)."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    constrain: bool  # with a grammar: only tokens valid in the state reached so far


def _fill_position(t, logits, carry, prompt_length, grammar, options: SamplingOptions):
    """Returns (buffer, state, key) with position t of each row set: its prompt token, or one drawn from logits [n, vocab].

    Both samplers call this once per position t from the shortest prompt's length on, in order, after one key split
    per earlier position (_skip_draws), so the same key draws the same random numbers in both.
    """
    buffer, state, key = carry
    if grammar is not None and options.constrain:
        logits = constrain_logits(grammar, state[:, t - 1], logits)
    key, sub = jax.random.split(key)
    if options.greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        token = jax.random.categorical(sub, filter_logits(logits, temperature=options.temperature, top_k=options.top_k,
                                                          top_p=options.top_p))
    in_prompt = t < prompt_length  # [n]: each row has its own prompt length
    token = jnp.where(in_prompt, buffer[:, t], token).astype(buffer.dtype)
    buffer = buffer.at[:, t].set(token)
    if grammar is not None:
        state = state.at[:, t].set(jnp.where(in_prompt, state[:, t], advance(grammar, state[:, t - 1], token)))
    return buffer, state, key


def _skip_draws(key, n_positions):
    """Returns key after the splits of n_positions positions that draw nothing (prompt tokens in every row)."""
    return jax.lax.fori_loop(0, n_positions, lambda _, k: jax.random.split(k)[0], key)


@functools.partial(jax.jit, static_argnames=("model", "options"))
def _rerun_sample_loop(model, params, buffer, prompt_length, key, grammar, state, *, options):
    """The reference sampler: every position re-runs the decoder on the whole buffer (O(length²) work)."""
    first_sampled = jnp.min(prompt_length)  # earlier positions hold prompt tokens in every row

    def body(t, carry):
        features = None if grammar is None else grammar.features[carry[1]]
        logits = model.apply({"params": params}, carry[0], state_features=features)[:, t - 1]
        return _fill_position(t, logits, carry, prompt_length, grammar, options)

    key = _skip_draws(key, first_sampled - 1)
    buffer, state, _ = jax.lax.fori_loop(first_sampled, buffer.shape[1], body, (buffer, state, key))
    return buffer, state


@functools.partial(jax.jit, static_argnames=("model", "prefill_length", "options"))
def _cached_sample_loop(model, params, buffer, prompt_length, key, grammar, state, *, prefill_length, options):
    """The KV-cache sampler: one decoder step per position; the first prefill_length tokens go in one call."""

    def decode(cache, tokens, states):
        features = None if grammar is None else grammar.features[states]
        logits, updated = model.apply({"params": params, "cache": cache}, tokens, state_features=features, decode=True,
                                      mutable=["cache"])
        return logits, updated["cache"]

    cache = init_cache(model, *buffer.shape)
    if prefill_length:  # positions 0 .. prefill_length - 1 hold prompt tokens in every row
        _, cache = decode(cache, buffer[:, :prefill_length], state[:, :prefill_length])
        key = _skip_draws(key, prefill_length)

    def body(t, carry):
        buffer, state, key, cache = carry
        previous = lambda x: jax.lax.dynamic_slice_in_dim(x, t - 1, 1, axis=1)  # noqa: E731
        logits, cache = decode(cache, previous(buffer), previous(state))
        return _fill_position(t, logits[:, 0], (buffer, state, key), prompt_length, grammar, options) + (cache,)

    buffer, state, _, _ = jax.lax.fori_loop(prefill_length + 1, buffer.shape[1], body, (buffer, state, key, cache))
    return buffer, state


def resolve_method(cfg, method: str | None) -> str:
    """Returns "cache" or "rerun": the given method, checked, or (None) "cache" where the model supports it."""
    reason = kv_cache_unsupported_reason(cfg)
    if method is None:
        return "rerun" if reason else "cache"
    if method not in ("cache", "rerun"):
        raise ValueError(f"sampling method must be 'cache' or 'rerun', got {method!r}")
    if method == "cache" and reason:
        raise ValueError(f"sampling method 'cache' is not available: {reason}; use method='rerun'")
    return method


def _rows(values, n: int | None, what: str) -> list[list[int]]:
    """Returns one list of ints per row from a single list (repeated n times) or a list of lists."""
    values = list(values)
    if values and isinstance(values[0], (list, tuple)):
        if n is not None and n != len(values):
            raise ValueError(f"sample() got {len(values)} {what}s (one per row) but n={n}; leave n out")
        return [[int(v) for v in row] for row in values]
    return [[int(v) for v in values]] * (1 if n is None else n)


def sample(model: Decoder, params, prompt, *, n: int | None = None, length: int | None = None, key=None,
           greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           grammar=None, constrain: bool = True, prompt_states=None, method: str | None = None):
    """Returns sequences [rows, length] of token ids, each starting with its prompt.

    prompt: a list of token ids shared by n rows (default 1), or a list of prompts, one per row, of any lengths.
    grammar: tables with valid[state, token], next_state[state, token] and features[state, F]; when given, the
    state is tracked (its features feed a model with grammar_state_embedding) and, with constrain=True, every
    sampled token is valid in the state reached so far. prompt_states: the grammar state after each
    prompt token, shaped like prompt (default: grammar.start for every prompt position, i.e. a prompt outside the
    grammar). method: "cache" (KV-cache decoding, one decoder step per token) or "rerun" (the reference: the whole
    decoder re-run on the buffer for every token); None = "cache" where the model supports it. Both give the same
    samples for the same key, up to float rounding in the logits.
    """
    length = length or model.cfg.max_len
    check_sampling_settings(n=1 if n is None else n, temperature=temperature, top_k=top_k, top_p=top_p)
    prompts = _rows(prompt, n, "prompt")
    if not prompts or min(map(len, prompts)) == 0:
        raise SamplingError("sample: needs a non-empty prompt (e.g. [tokenizer.eos_id])")
    check_sample_length(max(map(len, prompts)), length, model.cfg.max_len)
    method = resolve_method(model.cfg, method)
    key = jax.random.key(0) if key is None else key
    buffer = np.zeros((len(prompts), length), np.int32)
    state = np.zeros((len(prompts), length), np.int32)
    if grammar is not None:
        if prompt_states is None:
            prompt_states = [[int(grammar.start)] * len(row) for row in prompts]
        for row, (tokens, row_states) in enumerate(zip(prompts, _rows(prompt_states, len(prompts), "prompt_states list"))):
            if len(row_states) != len(tokens):
                raise ValueError(f"prompt_states has {len(row_states)} states for a prompt of {len(tokens)} tokens")
            state[row, :len(tokens)] = row_states
    for row, tokens in enumerate(prompts):
        buffer[row, :len(tokens)] = tokens
    prompt_length = jnp.asarray([len(row) for row in prompts], jnp.int32)
    options = SamplingOptions(bool(greedy), float(temperature), int(top_k), float(top_p), bool(constrain))
    args = (model, params, jnp.asarray(buffer), prompt_length, key, grammar, jnp.asarray(state))
    if method == "cache":
        tokens, _ = _cached_sample_loop(*args, prefill_length=min(map(len, prompts)) - 1, options=options)
    else:
        tokens, _ = _rerun_sample_loop(*args, options=options)
    return tokens


def cut_at_eos(tokens, eos_id: int, skip: int | list[int] = 0) -> list[list[int]]:
    """Returns each row after `skip` prompt tokens (one count, or one per row), up to (not including) its first <eos>."""
    rows = []
    tokens = jax.device_get(tokens).tolist()
    skips = [skip] * len(tokens) if isinstance(skip, int) else list(skip)
    for row, row_skip in zip(tokens, skips):
        row = row[row_skip:]
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows
