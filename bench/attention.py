"""Dense vs top-k attention: forward and forward+backward time and peak memory, as ratios from one run.

    python bench/attention.py                 # L in {256, ..., 4096}, batch 1, 4 heads, head_dim 64, k = 32
    python bench/attention.py --quick         # L in {256, 512}: a smoke run
    python bench/attention.py --lengths 1024,4096 --chunk 128

Every variant is causal. Times are the minimum over --repeats calls, the variants called round-robin so that
a busy machine slows them alike. Memory:
  * JAX: XLA's compiled memory analysis, `jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`,
    the scratch buffers the executable allocates beyond its arguments and outputs (exact, not sampled).
  * PyTorch: the torch profiler with profile_memory=True; the peak of the running sum of the allocations and
    frees it records, in time order, beyond the inputs.
Both are printed next to the size of one float32 [batch, heads, L, L] score matrix, the thing top-k avoids.
"""

from __future__ import annotations

import argparse
import math
import time


import jax
import jax.numpy as jnp
import numpy as np

from toyjax.models.topk_attention import (
    _topk_attention_autodiff,
    block_prefiltered_top_k,
    topk_attention,
)

MiB = 2**20


def dense_naive(q, k, v):
    """Materialises the [batch, heads, L, L] scores and probabilities, as a textbook would."""
    length = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def jax_variants(top_k, chunk):
    return {
        "dense naive": dense_naive,
        "dense jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        "topk unchunked": lambda q, k, v: topk_attention(q, k, v, top_k=top_k),
        f"topk chunk={chunk}": lambda q, k, v: topk_attention(q, k, v, top_k=top_k, query_chunk=chunk),
        f"topk chunk={chunk} autodiff+remat": lambda q, k, v: _topk_attention_autodiff(
            q, k, v, top_k=top_k, query_chunk=chunk
        ),
    }


def with_backward(fn):
    """Returns f(q, k, v) -> (loss, grads): one forward and one backward pass."""
    return jax.value_and_grad(lambda q, k, v, cot: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2))


def torch_variants(top_k):
    import torch

    def naive(q, k, v):  # [batch, heads, L, d]
        length = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v

    def naive_topk(q, k, v):
        length = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        kept, indices = scores.topk(min(top_k, length), dim=-1)  # [b, h, L, k]
        weights = kept.softmax(-1)
        weights = torch.nan_to_num(weights, nan=0.0)
        batch, heads, _, head_dim = v.shape
        flat = indices.reshape(batch, heads, -1, 1).expand(-1, -1, -1, head_dim)  # [b, h, L*k, d]
        rows = torch.gather(v, 2, flat).reshape(batch, heads, length, -1, head_dim)  # the kept value rows
        return (weights[..., None] * rows).sum(3)

    return {
        "torch SDPA": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        "torch dense naive": naive,
        "torch naive topk": naive_topk,
    }


def torch_peak_bytes(fn):
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for _, change in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        running += change
        peak = max(peak, running)
    del torch
    return peak


def measure(length, args):
    batch, heads, head_dim = 1, 4, 64
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    q, k, v, cot = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.float32) for key in keys)
    rows = []  # (name, pass, call, memory bytes)
    for name, fn in jax_variants(args.top_k, args.chunk).items():
        for kind, f, inputs in (("fwd", fn, (q, k, v)), ("fwd+bwd", with_backward(fn), (q, k, v, cot))):
            compiled = jax.jit(f).lower(*inputs).compile()
            jax.block_until_ready(compiled(*inputs))
            call = lambda c=compiled, x=inputs: jax.block_until_ready(c(*x))  # noqa: E731
            rows.append((name, kind, call, compiled.memory_analysis().temp_size_in_bytes))
    if args.torch:
        import torch

        torch.manual_seed(0)
        tq, tk, tv, tcot = (torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy()) for x in (q, k, v, cot))
        for name, fn in torch_variants(args.top_k).items():
            forward = lambda fn=fn: fn(tq, tk, tv)  # noqa: E731

            def backward(fn=fn):
                leaves = [x.detach().requires_grad_() for x in (tq, tk, tv)]
                (fn(*leaves) * tcot).sum().backward()

            for kind, call in (("fwd", lambda f=forward: torch.no_grad()(f)()), ("fwd+bwd", backward)):
                call()
                rows.append((name, kind, call, torch_peak_bytes(call)))
    best = {id(row): float("inf") for row in rows}
    for _ in range(args.repeats):  # round-robin, so load spikes hit every variant
        for row in rows:
            start = time.perf_counter()
            row[2]()
            best[id(row)] = min(best[id(row)], time.perf_counter() - start)
    return [(name, kind, best[id(row)], memory) for row in rows for (name, kind, _, memory) in [row]]


def components(length, top_k, chunk, repeats):
    """Returns forward ms of the parts of chunked top-k run alone: the floor (causal scores + one pass) and top-k."""
    keys = jax.random.split(jax.random.PRNGKey(length), 3)
    q, k = (jax.random.normal(key, (1, length, 4, 64), jnp.float32) for key in keys[:2])
    n_chunks = -(-length // chunk)

    key_block = min(4 * chunk, length)

    def scores_only(q, k):  # the causal chunk/key-block loops of top-k, reducing scores with a max, no top_k
        def one_chunk(i):
            q_chunk = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, axis=1)

            def one_block(j, running_max):
                k_block = jax.lax.dynamic_slice_in_dim(k, j * key_block, key_block, axis=1)
                return jnp.maximum(running_max, jnp.einsum("bchd,bkhd->bhck", q_chunk, k_block).max(-1))

            n_blocks = ((i + 1) * chunk - 1) // key_block + 1
            return jax.lax.fori_loop(0, n_blocks, one_block, jnp.full((1, 4, chunk), -jnp.inf))

        return jax.lax.map(one_chunk, jnp.arange(n_chunks))

    causal_scores = jax.random.normal(keys[2], (4, length, (length + 1) // 2), jnp.float32)  # half: causal
    parts = {
        "floor: causal q·kᵀ in the same chunk loops + one max pass": (jax.jit(scores_only), (q, k)),
        "lax.top_k alone over the causal half of the scores": (jax.jit(lambda s: jax.lax.top_k(s, top_k)), (causal_scores,)),
        "block_prefiltered_top_k alone, same scores": (
            jax.jit(lambda s: block_prefiltered_top_k(s, top_k)), (causal_scores,)
        ),
    }
    out = {}
    for name, (fn, inputs) in parts.items():
        jax.block_until_ready(fn(*inputs))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    return out


def report(length, results, args):
    scores_bytes = 1 * 4 * length * length * 4
    forward = {name: t for name, kind, t, _ in results if kind == "fwd"}
    best_dense_name = min((n for n in forward if "dense" in n or "SDPA" in n), key=forward.get)
    print(f"\nL={length}  (one float32 [1, 4, L, L] score matrix = {scores_bytes / MiB:.1f} MiB; "
          f"time ratios against the fastest dense forward, {best_dense_name})")
    print(f"{'variant':42s} {'pass':8s} {'ms':>9s} {'x best dense fwd':>17s} {'peak MiB':>9s} {'/ LxL scores':>13s}")
    for name, kind, seconds, memory in results:
        print(f"{name:42s} {kind:8s} {seconds * 1e3:9.1f} {seconds / forward[best_dense_name]:17.2f} "
              f"{memory / MiB:9.1f} {memory / scores_bytes:13.3f}")
    chunked = [(n, k, t, m) for n, k, t, m in results if n == f"topk chunk={args.chunk}"]
    summary = {kind: (t / forward[best_dense_name], m / scores_bytes) for _, kind, t, m in chunked}
    if args.components:
        for name, seconds in components(length, args.top_k, args.chunk, args.repeats).items():
            print(f"  component {name:58s} {seconds * 1e3:9.1f} ms {seconds / forward[best_dense_name]:6.2f}x")
    print(f"summary L={length}: chunked top-k fwd time {summary['fwd'][0]:.2f}x best dense (target <= 1.5), "
          f"peak memory fwd {summary['fwd'][1]:.3f} / fwd+bwd {summary['fwd+bwd'][1]:.3f} of the LxL scores "
          f"(target <= 0.125)")
    times = {(name, kind): t for name, kind, t, _ in results}
    topk_name = f"topk chunk={args.chunk}"
    if ("torch SDPA", "fwd") in times:
        print(f"summary L={length}: chunked top-k fwd / torch SDPA fwd "
              f"{times[topk_name, 'fwd'] / times['torch SDPA', 'fwd']:.2f}x (target <= 2)")
    jax_dense = min(times[name, "fwd+bwd"] for name in jax_variants(args.top_k, args.chunk) if "dense" in name)
    print(f"summary L={length}: chunked top-k fwd+bwd / fastest JAX dense fwd+bwd "
          f"{times[topk_name, 'fwd+bwd'] / jax_dense:.2f}x (target < 1)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--quick", action="store_true", help="smoke run: L in {256, 512}, 2 repeats")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=128, help="query chunk of the chunked top-k")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--components", action="store_true",
                        help="also time the parts of top-k alone (score matmuls, lax.top_k) against the best dense")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch reference")
    args = parser.parse_args(argv)
    lengths = [256, 512] if args.quick else [int(x) for x in args.lengths.split(",") if x]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch not installed: skipping the PyTorch reference")
            args.torch = False
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch 1, 4 heads, head_dim 64, causal, "
          f"k={args.top_k}, chunk={args.chunk}, min of {args.repeats} calls")
    for length in lengths:
        report(length, measure(length, args), args)


if __name__ == "__main__":
    main()
