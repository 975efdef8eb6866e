"""Jitted sampling from a decoder: greedy, temperature, top-k, top-p, optionally restricted by a grammar.

The whole loop runs inside one jit (lax.fori_loop over positions), each step re-running the decoder on the
fixed-size buffer: O(length) forward passes, which is what toy models at max_len <= 512 need and keeps every
attention kind usable as is. Reproducible: the same key gives the same samples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from toyjax.grammar import advance, constrain_logits
from toyjax.models.decoder import Decoder


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


@functools.partial(jax.jit, static_argnames=("model", "length", "greedy", "temperature", "top_k", "top_p", "constrain"))
def _sample_loop(model, params, buffer, prompt_length, key, grammar, state, *, length, greedy, temperature, top_k, top_p,
                 constrain):
    def body(t, carry):
        buffer, state, key = carry
        features = None if grammar is None else grammar.features[state]
        logits = model.apply({"params": params}, buffer, state_features=features)[:, t - 1]
        if grammar is not None and constrain:
            logits = constrain_logits(grammar, state[:, t - 1], logits)
        key, sub = jax.random.split(key)
        if greedy:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(sub, filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p))
        token = jnp.where(t < prompt_length, buffer[:, t], token).astype(buffer.dtype)
        buffer = buffer.at[:, t].set(token)
        if grammar is not None:
            advanced = advance(grammar, state[:, t - 1], token)
            state = state.at[:, t].set(jnp.where(t < prompt_length, state[:, t], advanced))
        return buffer, state, key

    buffer, state, _ = jax.lax.fori_loop(1, length, body, (buffer, state, key))
    return buffer, state


def sample(model: Decoder, params, prompt: list[int], *, n: int = 1, length: int | None = None, key=None,
           greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           grammar=None, constrain: bool = True, prompt_states=None):
    """Returns n sequences [n, length] of token ids that start with `prompt`.

    grammar: tables with valid[state, token], next_state[state, token] and features[state, F]; when given, the
    state is tracked (its features feed a model with grammar_state_embedding) and, with constrain=True, every
    sampled token is valid in the state reached so far. prompt_states: the grammar state after each
    prompt token (default: grammar.start for every prompt position, i.e. a prompt outside the grammar).
    """
    length = length or model.cfg.max_len
    check_sampling_settings(n=n, temperature=temperature, top_k=top_k, top_p=top_p)
    check_sample_length(len(prompt), length, model.cfg.max_len)
    key = jax.random.key(0) if key is None else key
    buffer = jnp.zeros((n, length), jnp.int32).at[:, :len(prompt)].set(jnp.asarray(prompt, jnp.int32))
    state = jnp.zeros((n, length), jnp.int32)
    if grammar is not None:
        states = prompt_states if prompt_states is not None else [int(grammar.start)] * len(prompt)
        state = state.at[:, :len(prompt)].set(jnp.asarray(states, jnp.int32))
    tokens, _ = _sample_loop(model, params, buffer, len(prompt), key, grammar, state, length=length, greedy=greedy,
                             temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                             constrain=bool(constrain))
    return tokens


def cut_at_eos(tokens, eos_id: int, skip: int = 0) -> list[list[int]]:
    """Returns each row after `skip` prompt tokens, up to (not including) its first <eos>."""
    rows = []
    for row in jax.device_get(tokens).tolist():
        row = row[skip:]
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows
