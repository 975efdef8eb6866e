"""MoE feed-forward layer vs a dense FFN with the same active compute, forward + backward, measured side by side.

    .venv/bin/python bench/moe.py            # tokens 4096 as 32 rows of 128, d_model 256, d_ff 1024, 8 experts, top-2
    .venv/bin/python bench/moe.py --quick    # small shapes, a few seconds

The dense reference has d_ff = top_k·d_ff, so both do the same matmul FLOPs per token. Sort dispatch is dropless
(capacity_factor 0); einsum dispatch uses capacity_factor 1.25 per row of --seq-len tokens (the layer's causal
capacity groups; its dispatch tensors grow with capacity). With torch installed, the same three layers in PyTorch
(sort dispatch by per-expert slicing, einsum with per-row causal capacity) are timed too.
Times are the minimum over interleaved repetitions; --cpu-time reports process CPU time instead of wall time, which
is steadier on a shared machine (pin to one core with `taskset -c 0` to compare single-thread work).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from toyjax.config import ModelConfig, MoEConfig
from toyjax.models.ffn import DenseFFN
from toyjax.models.moe import MoE


def jax_layers(args):
    """Returns {name: (step_fn, args)} with step = jitted value_and_grad of a random projection of the output."""
    def cfg(ffn_width, dispatch, capacity_factor):
        return ModelConfig(d_model=args.d_model, d_ff=ffn_width, max_len=args.seq_len, moe=MoEConfig(
            n_experts=args.experts, top_k=args.top_k, dispatch=dispatch, capacity_factor=capacity_factor))

    x = jax.random.normal(jax.random.key(0), (args.tokens // args.seq_len, args.seq_len, args.d_model))
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    modules = {"dense": DenseFFN(cfg(args.top_k * args.d_ff, "sort", 0.0)),
               "moe_sort": MoE(cfg(args.d_ff, "sort", 0.0)),
               "moe_einsum": MoE(cfg(args.d_ff, "einsum", 1.25))}
    out = {}
    for name, module in modules.items():
        params = module.init(jax.random.key(2), x)["params"]

        def loss(params, x, module=module):
            y, side = module.apply({"params": params}, x, deterministic=False, rngs={"noise": jax.random.key(3)},
                                   mutable=["aux_loss", "metrics", "intermediates"])
            return jnp.sum(y * cotangent) + sum(jnp.sum(v) for v in jax.tree.leaves(side.get("aux_loss", {})))

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        out[f"jax {name}"] = (lambda step=step, params=params: jax.block_until_ready(step(params, x)))
    return out


def torch_layers(args):
    """Returns the PyTorch reference layers (empty without torch)."""
    try:
        import torch
    except ImportError:
        return {}
    torch.manual_seed(0)
    t, d, f, e, k, n = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k, args.seq_len
    x = torch.randn(t, d, requires_grad=True)
    cot = torch.randn(t, d)
    dense = torch.nn.Sequential(torch.nn.Linear(d, k * f), torch.nn.GELU(), torch.nn.Linear(k * f, d))
    router = torch.nn.Linear(d, e, bias=False)
    w_up = torch.nn.Parameter(torch.randn(e, d, f) / math.sqrt(d))
    b_up = torch.nn.Parameter(torch.zeros(e, f))
    w_down = torch.nn.Parameter(torch.randn(e, f, d) / math.sqrt(f))
    b_down = torch.nn.Parameter(torch.zeros(e, d))

    def route():
        top, idx = router(x).topk(k, dim=-1)
        return idx, top.softmax(-1)

    def moe_sort():
        idx, gate = route()
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=e).tolist()
        xs = x[order // k]
        ys = torch.empty(t * k, d)
        start = 0
        for i, n in enumerate(counts):
            rows = slice(start, start + n)
            ys[rows] = torch.nn.functional.gelu(xs[rows] @ w_up[i] + b_up[i]) @ w_down[i] + b_down[i]
            start += n
        y = torch.zeros(t * k, d).index_copy(0, order, ys).view(t, k, d)
        return (y * gate[..., None]).sum(1)

    def moe_einsum():  # rows of n tokens, each with its own slots, filled in position order (causal)
        idx, gate = route()
        idx, gate, xg = idx.view(-1, n, k), gate.view(-1, n, k), x.view(-1, n, d)
        capacity = math.ceil(1.25 * n * k / e)
        hot = torch.nn.functional.one_hot(idx.reshape(-1, n * k), e)
        slot = ((hot.cumsum(1) - 1) * hot).sum(-1).view(idx.shape)
        keep = (slot < capacity).float()
        slot_hot = torch.nn.functional.one_hot(slot.clamp(max=capacity - 1), capacity).float() * keep[..., None]
        expert_hot = torch.nn.functional.one_hot(idx, e).float()
        dispatch = torch.einsum("glke,glkc->glec", expert_hot, slot_hot)
        combine = torch.einsum("glke,glkc,glk->glec", expert_hot, slot_hot, gate)
        h = torch.nn.functional.gelu(torch.einsum("glec,gld,edf->gecf", dispatch, xg, w_up) + b_up[:, None])
        out = torch.einsum("gecf,efd->gecd", h, w_down) + b_down[:, None]
        return torch.einsum("glec,gecd->gld", combine, out).reshape(t, d)

    def step(fn):
        def run():
            for p in (x, *dense.parameters(), *router.parameters(), w_up, b_up, w_down, b_down):
                p.grad = None
            (fn() * cot).sum().backward()
        return run

    return {"torch dense": step(lambda: dense(x)), "torch moe_sort": step(moe_sort), "torch moe_einsum": step(moe_einsum)}


def measure(layers: dict, repeats: int, cpu_time: bool) -> dict:
    clock = time.process_time if cpu_time else time.perf_counter
    for run in layers.values():
        run()  # compile / warm up
    times = {name: [] for name in layers}
    for _ in range(repeats):  # interleaved, so a burst of load hits every layer alike
        for name, run in layers.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    return {name: min(ts) for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row (max_len): the capacity group")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tokens 512, d_model 64, d_ff 128, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.d_model, args.d_ff, args.repeats = 512, 64, 128, 3
    if args.seq_len <= 0 or args.tokens % args.seq_len:
        parser.error(f"--tokens {args.tokens} must be a positive multiple of --seq-len {args.seq_len}")
    layers = jax_layers(args)
    if not args.no_torch:
        layers.update(torch_layers(args))
    print(f"backend {jax.default_backend()}, tokens {args.tokens} ({args.tokens // args.seq_len} rows of "
          f"{args.seq_len}), d_model {args.d_model}, d_ff {args.d_ff}, "
          f"{args.experts} experts, top-{args.top_k}; dense d_ff {args.top_k * args.d_ff}; "
          f"{'cpu' if args.cpu_time else 'wall'} time, min of {args.repeats}")
    times = measure(layers, args.repeats, args.cpu_time)
    for name, seconds in times.items():
        framework = name.split()[0]
        ratio = seconds / times[f"{framework} dense"]
        print(f"  {name:18s} {seconds * 1e3:9.1f} ms   {ratio:5.2f}x {framework} dense")
    summary = ", ".join(f"{n.replace(' moe_', ' ')} {t / times[n.split()[0] + ' dense']:.2f}x"
                        for n, t in times.items() if "moe" in n)
    print(f"MoE fwd+bwd vs equal-compute dense: {summary} (target: jax sort <= 1.10x on CPU)")
    return times


if __name__ == "__main__":
    main()
