"""Grammar-constrained vs plain sampling: per-token time side by side in one run, and grammar compile time.

    python bench/constrained_sampling.py            # 1000 stories + 1000 programs (221 tokens), d_model 128, 4 layers
    python bench/constrained_sampling.py --quick    # a smoke run with a tiny model

Both arms call toyjax.sample.sample (one jitted loop over positions) on the same random-init decoder, prompt
[<eos>, "calc"]; the constrained arm also gathers valid[state] to mask the logits and next_state[state, token] to
advance. The arms are called in alternating pairs; the overhead is the ratio of each arm's minimum time (the
median of the per-pair ratios is printed too: when the two disagree, the machine was too busy to tell).
A second line times the constraint alone: an argmax loop of 1000 steps in one jit, with and without mask + advance.
Target: constrained sampling costs <= 5 % more per token.
"""

from __future__ import annotations

import argparse
import time


import jax
import jax.numpy as jnp
import numpy as np

from toyjax import grammar as grammar_lib
from toyjax.config import ModelConfig
from toyjax.data import stories, structured
from toyjax.models.decoder import Decoder
from toyjax.sample import sample
from toyjax.tokenizers import TopWordTokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and vocabulary, few repeats")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab_size, args.d_model, args.layers, args.length, args.batch, args.repeats = 200, 32, 1, 32, 2, 3

    texts = structured.generate_documents(1000, seed=0) + stories.generate_texts(1000 if not args.quick else 200, 0)
    tokenizer = TopWordTokenizer.fit(texts, vocab_size=args.vocab_size, simplify="unk")
    start = time.perf_counter()
    tables = grammar_lib.compile_grammar(grammar_lib.load_default_grammar(), tokenizer.token_to_id)
    jax.block_until_ready(tables.valid)
    compile_s = time.perf_counter() - start
    n_states = tables.valid.shape[0]
    print(f"grammar compile: {compile_s * 1e3:.0f} ms for {n_states} states x {tokenizer.vocab_size} tokens "
          f"(max_depth={tables.feature_sizes[2] - 1})")

    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=args.d_model, n_layers=args.layers,
                      n_heads=max(1, args.d_model // 32), d_ff=4 * args.d_model, max_len=args.length)
    model = Decoder(cfg)
    params = model.init(jax.random.key(0), np.zeros((1, args.length), np.int32))["params"]
    prompt = [tokenizer.eos_id, tokenizer.token_to_id["calc"]]
    prompt_states = grammar_lib.annotate(tables, prompt).tolist()  # the state after each prompt token
    arms = {
        "plain": dict(grammar=None),
        "constrained": dict(grammar=tables, prompt_states=prompt_states),
    }
    times = {name: [] for name in arms}
    for name, kwargs in arms.items():  # compile each arm once
        jax.block_until_ready(sample(model, params, prompt, n=args.batch, length=args.length, **kwargs))
    for r in range(args.repeats):
        for name, kwargs in (arms.items() if r % 2 == 0 else reversed(arms.items())):
            start = time.perf_counter()
            out = sample(model, params, prompt, n=args.batch, length=args.length, key=jax.random.key(r), **kwargs)
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - start)
    tokens = args.length - len(prompt)
    best = {name: min(t) for name, t in times.items()}
    for name in arms:
        print(f"{name:12s} {best[name] / tokens * 1e3:8.3f} ms/token step "
              f"(batch {args.batch}, {tokens} steps, min of {args.repeats})")
    overhead = best["constrained"] / best["plain"] - 1
    paired = float(np.median(np.array(times["constrained"]) / np.array(times["plain"]))) - 1

    # The constraint alone: the same argmax loop (1000 steps in one jit) with and without mask + advance.
    state = np.full(args.batch, prompt_states[-1], np.int32)
    logits = np.random.default_rng(0).normal(size=(args.batch, tokenizer.vocab_size)).astype(np.float32)
    loops = {c: _argmax_loop(c) for c in (False, True)}
    loop_s = {c: _min_time(lambda c=c: loops[c](tables, state, logits), args.repeats) for c in loops}
    op_s = (loop_s[True] - loop_s[False]) / 1000
    print(f"constraint alone: {op_s * 1e6:.1f} us per step ({op_s / (best['plain'] / tokens) * 100:.2f} % of a plain "
          "sampling step)")
    verdict = "within" if overhead <= 0.05 else "ABOVE"
    print(f"constrained/plain = {1 + overhead:.3f} from min times ({verdict} the 5 % target; median of pair ratios "
          f"{1 + paired:.3f}, far from it = a noisy machine); grammar compile {compile_s * 1e3:.0f} ms "
          f"({n_states} states)")
    return {"compile_s": compile_s, "states": n_states, "overhead_min": overhead, "overhead_paired": paired,
            "constraint_op_s": op_s, **{f"{k}_s": v for k, v in best.items()}}


def _argmax_loop(constrained: bool):
    @jax.jit
    def loop(tables, state, logits):
        def body(i, carry):
            state, total = carry
            x = logits * (1.0 + 1e-3 * i)
            if constrained:
                x = grammar_lib.constrain_logits(tables, state, x)
            token = jnp.argmax(x, axis=-1)
            if constrained:
                state = grammar_lib.advance(tables, state, token)
            return state, total + token.sum()

        return jax.lax.fori_loop(0, 1000, body, (state, 0))

    return loop


def _min_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
