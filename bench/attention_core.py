"""The dense attention core of a train step (q·kᵀ, causal mask, softmax, ·v), forward + backward, in several forms.

    .venv/bin/python bench/attention_core.py                 # config a's shape and config b's (bench/train_throughput.py)
    .venv/bin/python bench/attention_core.py --rounds 40 --shapes a
    .venv/bin/python bench/attention_core.py --train-step a  # whole train steps: toyjax's form vs bias-mask, alternating
    .venv/bin/python bench/attention_core.py --quick         # small shapes, a few seconds

Forms, all causal, gradients checked against toyjax's to 1e-3 before timing:
  toyjax          toyjax.models.attention.attention_weights + ·v (scores scaled after q·kᵀ, `where` mask,
                  jax.nn.softmax)
  bias-mask       the scale on q, the mask an added -inf bias, softmax with the row max held constant
  heads-major     bias-mask on [batch, heads, length, head_dim] (transposed in and out)
  recompute-vjp   a custom VJP keeping only the output and the row log-sum-exp; the backward recomputes the
                  probabilities (flash attention's backward, one block)
  jax-sdpa        jax.nn.dot_product_attention (XLA implementation)
  torch-sdpa      torch.nn.functional.scaled_dot_product_attention (a fused CPU kernel), when torch is installed
Times: the median over interleaved rounds (wall clock, 2 threads for torch), ratios to the toyjax form.
--train-step: bench/train_throughput.py's config trained with the "dense" kind and with bias-mask registered as a
kind, the two alternating (4 steps a round); prints the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from toyjax.models import registry
from toyjax.models.attention import attention_weights, causal_mask

SHAPES = {"a": (32, 128, 4, 32), "b": (16, 256, 8, 32)}  # batch, length, heads, head_dim of train_throughput's configs


def toyjax_form(q, k, v):
    return jnp.einsum("bhqk,bkhd->bqhd", attention_weights(q, k), v)


def bias_mask_weights(q, k):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k, preferred_element_type=jnp.float32)
    scores = scores + jnp.where(causal_mask(q.shape[1], k.shape[1]), 0.0, -jnp.inf)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    return weights / weights.sum(-1, keepdims=True)


def bias_mask_form(q, k, v):
    return jnp.einsum("bhqk,bkhd->bqhd", bias_mask_weights(q, k), v)


@registry.register_attention("bench_bias_mask")
def _bias_mask_kind(q, k, v, *, causal, cfg, hook=None):
    weights = bias_mask_weights(q, k)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v), {"attention_weights": weights}


def heads_major_form(q, k, v):
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q * q.shape[-1] ** -0.5, k)
    scores = scores + jnp.where(causal_mask(q.shape[2], k.shape[2]), 0.0, -jnp.inf)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    return jnp.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdims=True), v).transpose(0, 2, 1, 3)


def _scores(q, k):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return jnp.where(causal_mask(q.shape[1], k.shape[1]), scores, -jnp.inf)


@jax.custom_vjp
def recompute_vjp_form(q, k, v):
    return recompute_forward(q, k, v)[0]


def recompute_forward(q, k, v):
    scores = _scores(q, k)
    row_max = scores.max(-1, keepdims=True)
    exp = jnp.exp(scores - row_max)
    total = exp.sum(-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", exp / total, v)
    return out, (q, k, v, out, row_max + jnp.log(total))


def recompute_backward(saved, d_out):
    q, k, v, out, log_sum_exp = saved
    probs = jnp.exp(_scores(q, k) - log_sum_exp)
    d_v = jnp.einsum("bhqk,bqhd->bkhd", probs, d_out)
    d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v)
    d_scores = probs * (d_probs - jnp.einsum("bqhd,bqhd->bhq", d_out, out)[..., None]) * q.shape[-1] ** -0.5
    return jnp.einsum("bhqk,bkhd->bqhd", d_scores, k), jnp.einsum("bhqk,bqhd->bkhd", d_scores, q), d_v


recompute_vjp_form.defvjp(recompute_forward, recompute_backward)


def jax_sdpa_form(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


FORMS = {"toyjax": toyjax_form, "bias-mask": bias_mask_form, "heads-major": heads_major_form,
         "recompute-vjp": recompute_vjp_form, "jax-sdpa": jax_sdpa_form}


def timed_steps(shape):
    """Returns {form: step()} (each a jitted forward+backward, checked against toyjax's gradients)."""
    q, k, v, cotangent = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 4))
    steps = {}
    for name, form in FORMS.items():
        grad = jax.jit(jax.grad(lambda q, k, v, form=form: jnp.sum(form(q, k, v) * cotangent), argnums=(0, 1, 2)))
        steps[name] = lambda grad=grad: jax.block_until_ready(grad(q, k, v))
    want = steps["toyjax"]()
    for name, step in steps.items():
        for got, ref in zip(step(), want):
            np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3, err_msg=name)
    try:
        import torch
    except ImportError:
        return steps
    torch.set_num_threads(2)
    tq, tk, tv, tc = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous().requires_grad_()
                      for x in (q, k, v, cotangent))

    def torch_step():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        (out * tc).sum().backward()
        tq.grad = tk.grad = tv.grad = None

    steps["torch-sdpa"] = torch_step
    return steps


def compare_train_steps(config: str, rounds: int) -> None:
    """Prints the median train-step time of config with the "dense" kind and with bench_bias_mask, alternating."""
    import train_throughput as bench  # the sibling script (run as python bench/...)

    runners = {}
    for kind in ("dense", "bench_bias_mask"):
        cfg, _ = bench.make_config(config, kind)
        runners[kind] = bench.JaxRunner(cfg, bench.synthetic_batches(cfg, 4))
        runners[kind].run(2)  # compile
    times = {kind: [] for kind in runners}
    for i in range(rounds):
        for kind in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
            start = time.perf_counter()
            runners[kind].run(4)
            times[kind].append((time.perf_counter() - start) / 4)
    for kind, ts in times.items():
        print(f"config {config}, {kind:16s} median {1e3 * np.median(ts):8.1f} ms/step (min {1e3 * min(ts):.1f})")
    print(f"bias-mask / toyjax: {np.median(times['bench_bias_mask']) / np.median(times['dense']):.3f} (median), "
          f"{min(times['bench_bias_mask']) / min(times['dense']):.3f} (min)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--shapes", default="a,b", help="comma-separated subset of: " + ",".join(SHAPES))
    parser.add_argument("--train-step", choices=sorted(SHAPES), help="time whole train steps of this config instead")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    if args.train_step:
        return compare_train_steps(args.train_step, args.rounds)
    shapes = {"quick": (2, 32, 2, 16)} if args.quick else {s: SHAPES[s] for s in args.shapes.split(",")}
    for label, shape in shapes.items():
        steps = timed_steps(shape)
        times = {name: [] for name in steps}
        for _ in range(3 if args.quick else args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        base = np.median(times["toyjax"])
        print(f"\nshape {label}: batch, length, heads, head_dim = {shape}; forward+backward, median of "
              f"{len(times['toyjax'])} rounds")
        for name, ts in times.items():
            print(f"  {name:14s} {1e3 * np.median(ts):8.2f} ms   {np.median(ts) / base:5.2f}x toyjax")


if __name__ == "__main__":
    main()
