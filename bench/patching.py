"""Full layer × position residual-stream patching: vectorised (toyjax.interp.patch_activation) against the
one-run-per-index Python loop, side by side in one run, compile time reported apart from run time.

    python bench/patching.py              # quickstart-sized model (d_model 128, 4 layers, 4 heads,
                                                       # vocab 160), 128 positions: 512 patched runs
    python bench/patching.py --quick      # 32 positions

Both sides are jitted and share the clean and corrupted caches' definition. The loop is the fair baseline: one
compiled hooked forward pass per layer (the position is an argument, so it compiles once per layer), called once
per (layer, position) from Python, as TransformerLens's patching helpers do. The vectorised side is one program:
for each layer and chunk of positions a jax.lax.map over the chunk's patched runs, each starting from the corrupted
run's cached residual stream at that layer and its KV-cache state at the chunk's start, and computing the positions
from there on only (toyjax/interp/suffix_patching.py; the metric reads the last position, so the last layer runs
there alone). Random-init weights: the timing does not depend on what the model learned.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from toyjax import interp
from toyjax.config import ModelConfig
from toyjax.models.decoder import Decoder


def timed(fn, repeats: int) -> float:
    """Returns the minimum wall time of fn() (results blocked on) over `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="patched runs per vmapped step (jax.lax.map); 0 = all of a layer's runs in one vmap")
    parser.add_argument("--chunk-size", type=int, default=16,
                        help="positions whose patched runs share one suffix start (compile time grows with n/chunk); "
                             "0 = patch_activation's default plain path")
    parser.add_argument("--edit-position", type=float, default=1 / 3,
                        help="where the corrupted prompt's one changed token sits, as a fraction of the length; the "
                             "positions before it are a shared prefix whose patches the vectorised side skips "
                             "(0 = nothing shared, the worst case)")
    parser.add_argument("--every-token", action="store_true",
                        help="change every token instead of one: no patch is a no-op, nothing can be skipped")
    parser.add_argument("--quick", action="store_true", help="32 positions, 2 repeats")
    args = parser.parse_args()
    length, repeats = (32, 2) if args.quick else (args.length, args.repeats)

    cfg = ModelConfig(vocab_size=160, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_len=128)
    model = Decoder(cfg)
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, length)), jnp.int32)
    edit = min(int(args.edit_position * length), length - 1)
    corrupted = clean.at[:, edit].set((clean[:, edit] + 1) % cfg.vocab_size)
    if args.every_token:
        corrupted = (clean + 1) % cfg.vocab_size
    variables = jax.jit(model.init)(jax.random.key(0), clean)
    metric = interp.logit_difference([3], [4])

    # Vectorised: one program for every layer and position.
    vectorised = jax.jit(lambda v, c, x: interp.patch_activation(
        (model, v), c, x, metric, batch_size=args.batch_size or None, chunk_size=args.chunk_size or None).patched)
    start = time.perf_counter()
    vectorised_compiled = vectorised.lower(variables, clean, corrupted).compile()
    vectorised_compile = time.perf_counter() - start

    # Loop: the clean cache once, then one compiled hooked run per layer, called once per position.
    names = [f"blocks.{i}.hook_resid_pre" for i in range(cfg.n_layers)]
    cache_fn = jax.jit(lambda v, c: interp.run_with_cache((model, v), c, names)[1])

    def one_run(layer):
        def run(v, x, clean_resid, position):
            hook = {names[layer]: lambda r: r.at[:, position].set(clean_resid[:, position])}
            return metric(interp.run_with_hooks((model, v), x, hook))
        return jax.jit(run)

    start = time.perf_counter()
    cache_compiled = cache_fn.lower(variables, clean).compile()
    clean_resid = cache_compiled(variables, clean)
    runs = [one_run(layer).lower(variables, corrupted, clean_resid[names[layer]], 0).compile()
            for layer in range(cfg.n_layers)]
    loop_compile = time.perf_counter() - start

    def loop():
        cache = cache_compiled(variables, clean)
        return np.array([[float(runs[layer](variables, corrupted, cache[names[layer]], position))
                          for position in range(length)] for layer in range(cfg.n_layers)])

    corrupted_run = jax.jit(lambda v, x: metric(interp.run_with_hooks((model, v), x, {})))
    corrupted_run(variables, corrupted)  # compile

    def skipping_loop():
        """The loop, but a patch whose clean and corrupted values are equal runs nothing (it is the corrupted run),
        as the vectorised side does; the fairer baseline when prompts share a prefix."""
        cache, corrupted_cache = cache_compiled(variables, clean), cache_compiled(variables, corrupted)
        unchanged = float(corrupted_run(variables, corrupted))
        changed = [np.any(np.asarray(cache[name]) != np.asarray(corrupted_cache[name]), axis=(0, 2)) for name in names]
        return np.array([[float(runs[layer](variables, corrupted, cache[names[layer]], position))
                          if changed[layer][position] else unchanged
                          for position in range(length)] for layer in range(cfg.n_layers)])

    # Round-robin repeats so that a busy machine slows every side alike.
    vectorised_time, loop_time, skipping_time = float("inf"), float("inf"), float("inf")
    for _ in range(repeats):
        vectorised_time = min(vectorised_time, timed(lambda: vectorised_compiled(variables, clean, corrupted), 1))
        loop_time = min(loop_time, timed(loop, 1))
        skipping_time = min(skipping_time, timed(skipping_loop, 1))
    vectorised_values = np.asarray(vectorised_compiled(variables, clean, corrupted))
    difference = float(max(np.abs(vectorised_values - loop()).max(), np.abs(vectorised_values - skipping_loop()).max()))

    n_runs = cfg.n_layers * length
    print(f"model: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}; "
          f"{length} positions -> {n_runs} patched runs; batch size {args.batch_size or 'all'}, "
          f"chunk size {args.chunk_size}; "
          f"{'every token changed' if args.every_token else f'the one changed token at position {edit}'}; "
          f"backend {jax.default_backend()}")
    print(f"{'':22}{'run (s)':>10}{'compile (s)':>13}{'runs/s':>10}")
    print(f"{'loop':22}{loop_time:10.3f}{loop_compile:13.2f}{n_runs / loop_time:10.0f}")
    print(f"{'loop, no-ops skipped':22}{skipping_time:10.3f}")
    print(f"{'vectorised':22}{vectorised_time:10.3f}{vectorised_compile:13.2f}{n_runs / vectorised_time:10.0f}")
    print(f"speed-up (run time): {loop_time / vectorised_time:.1f}x the loop, "
          f"{skipping_time / vectorised_time:.1f}x the loop that skips no-op patches; "
          f"max |difference| of the metrics: {difference:.2e}")


if __name__ == "__main__":
    main()
