"""Induction heads found with toyjax.interp alone: a 2-layer attention-only decoder on repeated random tokens.

    python experiments/induction_heads.py --out runs/induction_heads [--steps 1500 --seed 0 --config.KEY=VALUE]

Training rows (experiments/configs/induction_heads.py): max_len random tokens in which the first h (h drawn per row
from [max_len / 4, max_len / 2]) are repeated right after themselves, so a copy can only be found by content, not by
a fixed offset. Analysis rows: half = max_len / 2 random tokens, then the same again. Three views of the heads:

  attention   previous-token score = mean attention from position q to q - 1; induction score = mean attention
              from a repeated-half position q to q - half + 1 (the token after the current token's earlier copy)
  patching    noising: each head's clean z (all positions) replaced by its value from a corrupted run whose first
              half is fresh random tokens; damage = the fraction of the clean-to-corrupted drop in the metric
              (mean log-prob of the right next token on the repeated half) that this one head causes
  ablation    each head's z set to zero (run_with_hooks); the loss on the repeated half rises by how many nats

Expect the previous-token head in layer 0 and the induction head in layer 1 to top all three. Writes
OUT/findings.md, OUT/findings.json and the pictures (attention of the two heads, patching, ablation, views.html).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from toyjax import config as config_lib, interp, train
from toyjax.interp import views
from toyjax.models.decoder import Decoder, init_params

CONFIG = Path(__file__).resolve().parent / "configs" / "induction_heads.py"


def repeated_rows(key, batch: int, length: int, vocab: int) -> jax.Array:
    """Returns [batch, length] random tokens whose first h tokens repeat at h..2h (h per row in [length/4, length/2])."""
    token_key, half_key = jax.random.split(key)
    tokens = jax.random.randint(token_key, (batch, length), 0, vocab)
    half = jax.random.randint(half_key, (batch, 1), length // 4, length // 2 + 1)
    position = jnp.arange(length)[None, :]
    source = jnp.where((position >= half) & (position < 2 * half), position - half, position)
    return jnp.take_along_axis(tokens, source, axis=1)


def analysis_rows(seed: int, batch: int, half: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (clean, corrupted) [batch, 2 * half]: clean = r, r; corrupted = fresh random tokens, r."""
    rng = np.random.default_rng(seed)
    first, fresh = rng.integers(0, vocab, (2, batch, half))
    return np.concatenate([first, first], 1).astype(np.int32), np.concatenate([fresh, first], 1).astype(np.int32)


def train_model(cfg: config_lib.Config, *, quiet: bool = False):
    """Returns ((model, params), per-step losses) after cfg.train.steps steps on fresh repeated rows each step."""
    model = Decoder(cfg.model)
    params = init_params(model, cfg.train.seed)
    tx = train.make_optimizer(cfg.train)
    opt_state = tx.init(params)
    step = jax.jit(train.make_train_step(model, cfg, tx))
    data_key = jax.random.key(cfg.train.seed + 1)
    rows_of = jax.jit(repeated_rows, static_argnums=(1, 2, 3))
    losses = []
    for i in range(cfg.train.steps):
        rows = rows_of(jax.random.fold_in(data_key, i), cfg.train.batch_size, cfg.model.max_len + 1, cfg.model.vocab_size)
        params, opt_state, metrics = step(params, opt_state, {"inputs": rows[:, :-1], "targets": rows[:, 1:]},
                                          train.step_key(cfg.train.seed, i))
        losses.append(metrics["loss"])
        if not quiet and (i + 1) % 250 == 0:
            print(f"step {i + 1}: loss {float(metrics['loss']):.3f}", file=sys.stderr, flush=True)
    return (model, params), [float(x) for x in losses]


def repeated_half_log_prob(tokens, half: int):
    """Returns a metric: mean log-prob of the right next token where the repeat makes it predictable."""
    targets = jnp.asarray(tokens)[:, half + 1:]  # predicted from positions half .. 2 half - 2

    def metric(logits):
        log_probs = jax.nn.log_softmax(logits[:, half:-1], axis=-1)
        return jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

    return metric


def attention_scores(run, tokens, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (previous-token score, induction score), each [layer, head], from the cached attention patterns."""
    patterns = views.attention_patterns(run, tokens)  # [layer, batch, head, query, key]
    query = np.arange(half, tokens.shape[1])
    previous = patterns[:, :, :, np.arange(1, tokens.shape[1]), np.arange(tokens.shape[1] - 1)].mean((1, 3))
    induction = patterns[:, :, :, query, query - half + 1].mean((1, 3))
    return previous, induction


def ablation_rise(run, tokens, half: int) -> np.ndarray:
    """Returns [layer, head]: how much zeroing one head's z raises the loss (nats) on the repeated half."""
    cfg = run[0].cfg
    metric = repeated_half_log_prob(tokens, half)

    def loss(keep):  # keep: [layer, head], 1 = the head's output stays, 0 = zeroed
        hooks = {f"blocks.{layer}.attn.hook_z": lambda z, layer=layer: z * keep[layer][:, None]
                 for layer in range(cfg.n_layers)}
        return -metric(interp.run_with_hooks(run, tokens, hooks))

    one_zeroed = 1.0 - jnp.eye(cfg.n_layers * cfg.n_heads).reshape(-1, cfg.n_layers, cfg.n_heads)
    losses = jax.jit(jax.vmap(loss))(one_zeroed)  # one ablated run per head, one program
    return np.asarray(losses - jax.jit(loss)(jnp.ones((cfg.n_layers, cfg.n_heads)))).reshape(cfg.n_layers, cfg.n_heads)
