"""KV-cache vs full-rerun sampling: generated tokens/s of both samplers, side by side in one run.

    python bench/sampling.py            # d_model 128, 4 layers, 4 heads, vocab 160, batch 8, L = 128, 512
    python bench/sampling.py --quick    # a smoke run with a tiny model

At each buffer length L, toyjax.sample.sample generates the last G tokens (default 64) of every row after a random
prompt of L - G tokens, once per method on the same random-init decoder and key:
  rerun  the reference: the decoder re-runs on the whole L-token buffer for every generated token;
  cache  the prompt goes into the KV cache in one decoder call (counted in its time), then one decoder step per
         token, attending over all L cache slots (masked).
Neither method's cost per generated token depends on where in the buffer the token is, so G tokens stand for a whole
L-token run (a full rerun run at L = 512 takes minutes on a CPU). Compile time is excluded: each arm is called once
first (compile + one run; printed apart as first-call time minus the fastest run), then the arms alternate
`repeats` times and tokens/s comes from each arm's fastest run. Both arms must return the same samples.
Target: cache/rerun >= 5x at L = 512.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from toyjax.config import ModelConfig
from toyjax.models.decoder import Decoder
from toyjax.sample import sample

METHODS = ("rerun", "cache")


def timed(fn) -> tuple[float, object]:
    """Returns (seconds, result) of fn(), waiting for its arrays."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return time.perf_counter() - start, result


def measure(model, params, *, length: int, generate: int, batch: int, repeats: int) -> dict:
    """Returns first-call and fastest times per method, and whether both methods gave the same samples."""
    prompt = np.random.default_rng(length).integers(0, model.cfg.vocab_size, length - generate).tolist()

    def run(method, repeat):
        return sample(model, params, prompt, n=batch, length=length, key=jax.random.key(repeat), temperature=1.0,
                      method=method)

    first, outputs = {}, {}
    for method in METHODS:
        first[method], outputs[method] = timed(lambda: run(method, 0))
    times = {method: [] for method in METHODS}
    for repeat in range(repeats):
        for method in (METHODS if repeat % 2 == 0 else METHODS[::-1]):
            times[method].append(timed(lambda: run(method, repeat))[0])
    return {"first": first, "best": {m: min(t) for m, t in times.items()},
            "same_samples": bool(np.array_equal(outputs["rerun"], outputs["cache"]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short buffers, one repeat")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--generate", type=int, default=64, help="tokens generated per row at each length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=160)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.generate, args.repeats, args.d_model, args.layers, args.heads = [32, 64], 16, 1, 32, 1, 2
    if min(args.lengths) <= args.generate:
        raise SystemExit(f"error: --generate {args.generate} must be below every --lengths value {args.lengths}")

    cfg = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      d_ff=4 * args.d_model, max_len=max(args.lengths))
    model = Decoder(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    print(f"decoder d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}; batch "
          f"{args.batch}, {args.generate} generated tokens per row, fastest of {args.repeats}; {jax.devices()[0]}")
    print(f"{'length':>6} {'rerun tok/s':>12} {'cache tok/s':>12} {'cache/rerun':>12} {'compile rerun':>14} "
          f"{'compile cache':>14} {'same samples':>13}")
    results = {}
    for length in args.lengths:
        result = measure(model, params, length=length, generate=args.generate, batch=args.batch, repeats=args.repeats)
        tokens_per_s = {m: args.batch * args.generate / result["best"][m] for m in METHODS}
        compile_s = {m: result["first"][m] - result["best"][m] for m in METHODS}
        ratio = tokens_per_s["cache"] / tokens_per_s["rerun"]
        print(f"{length:>6} {tokens_per_s['rerun']:>12.0f} {tokens_per_s['cache']:>12.0f} {ratio:>11.1f}x "
              f"{compile_s['rerun']:>13.1f}s {compile_s['cache']:>13.1f}s {str(result['same_samples']):>13}", flush=True)
        results[length] = {"tokens_per_s": tokens_per_s, "ratio": ratio, "compile_s": compile_s,
                           "same_samples": result["same_samples"]}
    last = max(args.lengths)
    verdict = "meets" if results[last]["ratio"] >= 5 else "MISSES"
    print(f"cache/rerun at length {last}: {results[last]['ratio']:.1f}x ({verdict} the >= 5x target); compile time "
          "excluded (first call minus fastest run, shown apart)")
    return results


if __name__ == "__main__":
    main()
