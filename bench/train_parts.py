"""Each part of the train step on its own, forward + backward, toyjax (jitted) next to PyTorch eager, side by side.

    .venv/bin/python bench/train_parts.py                # configs a and b of bench/train_throughput.py
    .venv/bin/python bench/train_parts.py --configs b --rounds 30
    .venv/bin/python bench/train_parts.py --quick

Parts, at the config's shapes (tokens = batch x context): one block's LayerNorm (2 per block), attention
(qkv + causal attention + out projection; PyTorch uses its fused SDPA) and FFN (up, tanh-GELU, down); the tied
logits with cross-entropy (toyjax's step also computes the accuracy metric, as here); the embedding lookups; the
optimizer (clip + AdamW) over the whole model's parameters. toyjax's parts are its own modules and functions
(flax LayerNorm, toyjax's SelfAttention and DenseFFN, the loss and accuracy as train.make_loss_fn computes them,
train.make_optimizer). Each part's per-step total = its time x its count per step (layers, LayerNorms); the
difference column is how much of the step gap the part accounts for.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from toyjax.models.decoder import SelfAttention
from toyjax.models.ffn import DenseFFN
from toyjax.train import first_max_index, make_optimizer

import train_throughput  # the sibling script (run as python bench/...)


def jax_parts(cfg, batch: int):
    """Returns {part: (count per step, step())} for toyjax, each step a jitted forward+backward (or update)."""
    m = cfg.model
    tokens = batch * m.max_len
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, m.max_len, m.d_model))
    positions = jnp.broadcast_to(jnp.arange(m.max_len), (batch, m.max_len))
    targets = jax.random.randint(key, (tokens,), 0, m.vocab_size)
    ids = jax.random.randint(key, (batch, m.max_len), 0, m.vocab_size)

    def module_step(module, *args):  # arrays go in as arguments, not as constants XLA would fold
        params = module.init(key, *args)
        grad = jax.jit(jax.grad(lambda p, *a: jnp.sum(module.apply(p, *a) ** 2) * 1e-3, argnums=(0, 1)))
        return lambda: jax.block_until_ready(grad(params, *args))

    embedding = jax.random.normal(key, (m.vocab_size, m.d_model)) * 0.02

    def loss(h, embedding, targets):
        logits = h @ embedding.T
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return nll, (first_max_index(logits) == targets).mean()

    loss_grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    h = x.reshape(tokens, m.d_model)
    lookup_grad = jax.jit(jax.grad(lambda e, ids, x: jnp.sum(e[ids] * x)))
    from toyjax.models.decoder import Decoder, init_params

    params = init_params(Decoder(m), 0)
    tx = make_optimizer(cfg.train)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    @jax.jit
    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return {
        "LayerNorm": (2 * m.n_layers + 1, module_step(nn.LayerNorm(), x)),
        "attention (qkv, core, out)": (m.n_layers, module_step(SelfAttention(m), x, positions)),
        "FFN (up, GELU, down)": (m.n_layers, module_step(DenseFFN(m), x)),
        "logits + loss + accuracy": (1, lambda: jax.block_until_ready(loss_grad(h, embedding, targets))),
        "embedding lookup": (1, lambda: jax.block_until_ready(lookup_grad(embedding, ids, x))),
        "optimizer (clip + AdamW)": (1, lambda: jax.block_until_ready(update(params, state, grads))),
    }


def torch_parts(cfg, batch: int):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    m = cfg.model
    tokens = batch * m.max_len
    x = torch.randn(batch, m.max_len, m.d_model, requires_grad=True)
    targets = torch.randint(0, m.vocab_size, (tokens,))
    ids = torch.randint(0, m.vocab_size, (batch, m.max_len))
    ln = torch.nn.LayerNorm(m.d_model, eps=1e-6)
    qkv, out = torch.nn.Linear(m.d_model, 3 * m.d_model), torch.nn.Linear(m.d_model, m.d_model)
    up, down = torch.nn.Linear(m.d_model, m.d_ff), torch.nn.Linear(m.d_ff, m.d_model)
    embedding = (torch.randn(m.vocab_size, m.d_model) * 0.02).requires_grad_()
    h = torch.randn(tokens, m.d_model, requires_grad=True)

    def attention(x):
        b, length, d = x.shape
        q, k, v = qkv(x).view(b, length, 3, m.n_heads, d // m.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out(a.transpose(1, 2).reshape(b, length, d))

    def backward_of(fn):
        def step():
            (fn(x) ** 2).sum().mul(1e-3).backward()
            for p in (x, *ln.parameters(), *qkv.parameters(), *out.parameters(), *up.parameters(),
                      *down.parameters()):
                p.grad = None
        return step

    def loss_step():
        logits = h @ embedding.T
        F.cross_entropy(logits, targets).backward()
        (logits.argmax(-1) == targets).float().mean()
        h.grad = embedding.grad = None

    def lookup_step():
        (embedding[ids] * x.detach()).sum().backward()
        embedding.grad = None

    model, optimizer, _ = train_throughput.build_torch(m, cfg.train)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()

    return {
        "LayerNorm": backward_of(ln),
        "attention (qkv, core, out)": backward_of(attention),
        "FFN (up, GELU, down)": backward_of(lambda x: down(F.gelu(up(x), approximate="tanh"))),
        "logits + loss + accuracy": loss_step,
        "embedding lookup": lookup_step,
        "optimizer (clip + AdamW)": optimizer_step,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="a,b")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="config a at a quarter of its batch, 3 rounds")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in train_throughput.CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(train_throughput.CONFIGS)}")
    for name in (["a"] if args.quick else names):
        cfg, batch = train_throughput.make_config(name, "dense")
        batch = batch // 4 if args.quick else batch
        ours, theirs = jax_parts(cfg, batch), torch_parts(cfg, batch)
        times = {part: ([], []) for part in ours}
        for part, (_, step) in ours.items():  # compile and warm up
            step(), theirs[part]()
        for _ in range(3 if args.quick else args.rounds):
            for part, (_, step) in ours.items():
                for fn, out in ((step, times[part][0]), (theirs[part], times[part][1])):
                    start = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - start)
        print(f"\nconfig {name} (batch {batch}): median ms of {len(times[part][0])} rounds, per call and per step")
        print(f"  {'part':28s} {'count':>5s} {'toyjax':>8s} {'torch':>8s} {'ratio':>6s} {'toyjax/step':>12s} "
              f"{'torch/step':>11s} {'difference':>11s}")
        total = [0.0, 0.0]
        for part, (count, _) in ours.items():
            ms = [1e3 * np.median(t) for t in times[part]]
            total = [total[0] + count * ms[0], total[1] + count * ms[1]]
            print(f"  {part:28s} {count:5d} {ms[0]:8.2f} {ms[1]:8.2f} {ms[0] / ms[1]:6.2f} {count * ms[0]:12.1f} "
                  f"{count * ms[1]:11.1f} {count * (ms[0] - ms[1]):+11.1f}")
        print(f"  {'sum of the parts':28s} {'':5s} {'':8s} {'':8s} {total[0] / total[1]:6.2f} {total[0]:12.1f} "
              f"{total[1]:11.1f} {total[0] - total[1]:+11.1f}")


if __name__ == "__main__":
    main()
