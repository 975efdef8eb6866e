"""Sparse output representation: only grammar-valid tokens, in sampling, in the loss and in the inputs.

    python experiments/sparse_output.py --workdir runs/sparse_output [--config.train.steps=1000 ...]
    python experiments/sparse_output.py --workdir runs/sparse_output_quick --quick     # a smoke run

Four variants on the same structured data (experiments/configs/sparse_output.py) and the same step budget:
  plain                   train.loss="full", sampled freely
  plain+constrained       the same trained params, sampled with invalid tokens masked at every step
  valid_subset            train.loss="valid_subset" (invalid logits masked before the log-softmax), constrained
  valid_subset+state      the same plus model.grammar_state_embedding (grammar features added to the inputs)
Every saved checkpoint is re-evaluated here on the whole validation split with the same two measures for all
arms, so curves compare like with like:
  * valid-restricted perplexity: softmax over the tokens the grammar allows (what constrained sampling draws from)
  * full perplexity: softmax over the whole vocabulary (meaningless for the valid-subset arms, shown to see it)
  * invalid mass: probability the full softmax puts on forbidden tokens ("what the model puts there")
Writes WORKDIR/summary.json, WORKDIR/curves.png, WORKDIR/samples.png and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toyjax import config as config_lib  # noqa: E402
from toyjax import grammar as grammar_lib  # noqa: E402
from toyjax import load_run, train  # noqa: E402
from toyjax.checkpoints import Checkpoints  # noqa: E402
from toyjax.data import pipeline  # noqa: E402
from toyjax.sample import cut_at_eos, sample  # noqa: E402

CONFIG = ROOT / "experiments" / "configs" / "sparse_output.py"
ARMS = {  # trained arm -> (train.loss, model.grammar_state_embedding)
    "plain": ("full", False),
    "valid_subset": ("valid_subset", False),
    "valid_subset+state": ("valid_subset", True),
}


def make_scorer(model, tables, use_features: bool):
    """Returns a jitted score(params, inputs, targets, state) -> (sums..., top forbidden token per position)."""

    @jax.jit
    def score(params, inputs, targets, state):
        valid = tables.valid[state]
        features = tables.features[state] if use_features else None
        logits = model.apply({"params": params}, inputs, state_features=features)
        restricted = grammar_lib.masked_cross_entropy(logits, targets, valid)
        full = grammar_lib.masked_cross_entropy(logits, targets, jnp.ones_like(valid))
        invalid = grammar_lib.invalid_probability(logits, valid)
        in_grammar = state >= 2  # inside a structured document (outside one nothing is forbidden)
        top_invalid = jnp.argmax(jnp.where(valid, -jnp.inf, logits), axis=-1)
        return (restricted.sum(), full.sum(), (invalid * in_grammar).sum(), in_grammar.sum(),
                jnp.where(in_grammar, top_invalid, -1))

    return score


def evaluate(run, score, stream: pipeline.TokenStream, batch_size: int = 32) -> dict:
    """Returns restricted/full perplexity, invalid mass and the top forbidden tokens over the validation split."""
    length = run.config.model.max_len
    starts = np.arange((len(stream.tokens) - 1) // length) * length
    index = starts[:, None] + np.arange(length + 1)[None, :]
    windows, states = stream.tokens[index], stream.side["grammar_state"][index[:, :-1]]
    totals = np.zeros(4)
    top_counts = collections.Counter()
    for i in range(0, len(windows), batch_size):
        w, s = windows[i:i + batch_size], states[i:i + batch_size]
        *sums, top = score(run.params, w[:, :-1], w[:, 1:], s)
        totals += np.array([float(x) for x in sums])
        top_counts.update(t for t in np.asarray(top).ravel().tolist() if t >= 0)
    n_tokens = windows[:, 1:].size
    vocab = run.tokenizer.vocab
    return {"restricted_ppl": float(np.exp(totals[0] / n_tokens)), "full_ppl": float(np.exp(totals[1] / n_tokens)),
            "invalid_mass": float(totals[2] / max(totals[3], 1)),
            "top_invalid_tokens": {vocab[t]: round(float(c / max(totals[3], 1)), 3) for t, c in top_counts.most_common(5)}}


def grammatical_share(run, tables, *, constrained: bool, n: int, seed: int = 0) -> dict:
    """Samples n documents from the <eos> prompt; returns the share that are complete, grammatical programs.

    tables: compiled with free_text=False, so a constrained sample must start a program ("calc").
    """
    eos = run.tokenizer.eos_id
    tokens = sample(run.model, run.params, [eos], n=n, length=run.config.model.max_len, key=jax.random.key(seed),
                    temperature=1.0, grammar=tables if constrained else None)
    rows = cut_at_eos(tokens, eos, skip=1)
    ended = [eos in row for row in jax.device_get(tokens)[:, 1:].tolist()]
    good = 0  # complete programs the grammar accepts; unfinished samples (no <eos> within max_len) count as failures
    for row, finished in zip(rows, ended):
        try:
            states = grammar_lib.annotate(tables, row + [eos])
            good += bool(finished and row and states[0] >= 2)  # entered the grammar and ended where it may end
        except grammar_lib.GrammarError:
            pass
    texts = [run.tokenizer.decode(row) for row in rows[:3]]
    return {"grammatical": good / n, "finished": float(np.mean(ended)),
            "grammatical_of_finished": good / max(sum(ended), 1), "examples": texts}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/sparse_output")
    parser.add_argument("--quick", action="store_true", help="60 steps, 1500 documents: checks the script runs")
    parser.add_argument("--samples", type=int, default=200, help="documents sampled per variant")
    args, overrides = parser.parse_known_args(argv)
    base = config_lib.apply_overrides(config_lib.load_config_file(CONFIG), overrides)
    if args.quick:
        base.data.n_stories, base.train.steps, base.train.eval_every, base.train.checkpoint_every = 1500, 60, 20, 20
        args.samples = min(args.samples, 32)
    workdir = Path(args.workdir)
    summary = {"arms": {}, "config": base.to_dict()}
    for arm, (loss, embed) in ARMS.items():
        cfg = config_lib.from_dict(base.to_dict())
        cfg.train.loss, cfg.model.grammar_state_embedding = loss, embed
        print(f"== training {arm}", flush=True)
        result = train.run(cfg, workdir / arm, quiet=False)
        summary["arms"][arm] = {"final_train_run": {k: v for k, v in result.items() if isinstance(v, (int, float))}}

    # One validation stream (the tokenizer is fitted on the same documents in every arm, so take the first).
    first = load_run(workdir / "plain")
    docs = pipeline.load_documents(first.config.data)
    _, valid_docs = pipeline.split_train_valid(docs, first.config.data.valid_fraction)
    stream = pipeline.TokenStream.encode(first.tokenizer, valid_docs)
    tables, info = grammar_lib._compile(grammar_lib.load_default_grammar(), first.tokenizer.token_to_id,
                                        grammar_lib.DEFAULT_MAX_DEPTH)
    stream.side["grammar_state"] = grammar_lib.annotate(tables, stream.tokens, first.tokenizer.vocab)
    summary["grammar"] = {"states": info["states"], "compile_seconds": info["compile_seconds"],
                          "vocab_size": first.tokenizer.vocab_size}
    programs_only = grammar_lib.compile_grammar(grammar_lib.load_default_grammar(), first.tokenizer.token_to_id,
                                                free_text=False)
    tokens_per_step = base.train.batch_size * base.model.max_len
    for arm in ARMS:
        steps = Checkpoints(workdir / arm / "checkpoints", read_only=True).steps()
        curve, score = [], None
        for step in steps:
            run = load_run(workdir / arm, step)
            score = score or make_scorer(run.model, tables, run.config.model.grammar_state_embedding)
            curve.append({"step": step, "tokens": step * tokens_per_step, **evaluate(run, score, stream)})
        print(f"{arm:20s} " + "  ".join(f"{c['step']}:{c['restricted_ppl']:.3f}" for c in curve), flush=True)
        summary["arms"][arm]["curve"] = curve
        summary["arms"][arm]["final"] = curve[-1]
    variants = {"plain": ("plain", False), "plain+constrained": ("plain", True),
                "valid_subset": ("valid_subset", True), "valid_subset+state": ("valid_subset+state", True),
                "valid_subset (unconstrained, for reference)": ("valid_subset", False)}
    summary["sampling"] = {}
    for name, (arm, constrained) in variants.items():
        run = load_run(workdir / arm)
        summary["sampling"][name] = grammatical_share(run, programs_only, constrained=constrained, n=args.samples)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, workdir)
    print_table(summary)
    return summary


def print_table(summary):
    header = ["grammatical", "finished", "gram./fin.", "restr. ppl", "full ppl", "invalid mass"]
    print(f"\n{'variant':44s} " + " ".join(f"{h:>12s}" for h in header))
    for name, s in summary["sampling"].items():
        arm = name.split(" ")[0].replace("plain+constrained", "plain")
        final = summary["arms"][arm]["final"]
        row = [f"{s['grammatical']:.1%}", f"{s['finished']:.1%}", f"{s['grammatical_of_finished']:.1%}",
               f"{final['restricted_ppl']:.3f}", f"{final['full_ppl']:.3f}", f"{final['invalid_mass']:.3f}"]
        print(f"{name:44s} " + " ".join(f"{x:>12s}" for x in row))
    for arm, data in summary["arms"].items():
        print(f"  {arm}: top invalid tokens (share of grammar positions where they are the top forbidden logit) "
              f"{data['final']['top_invalid_tokens']}")


def plot(summary, workdir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, data in summary["arms"].items():
        tokens = [c["tokens"] for c in data["curve"]]
        axes[0].plot(tokens, [c["restricted_ppl"] for c in data["curve"]], marker="o", label=arm)
        axes[1].plot(tokens, [c["full_ppl"] for c in data["curve"]], marker="o", label=arm)
        axes[2].plot(tokens, [c["invalid_mass"] for c in data["curve"]], marker="o", label=arm)
    titles = ["valid-restricted perplexity", "full-softmax perplexity", "probability on forbidden tokens"]
    for ax, title in zip(axes, titles):
        ax.set_xlabel("training tokens")
        ax.set_title(title)
        ax.legend()
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(workdir / "curves.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(summary["sampling"])
    ax.barh(names, [summary["sampling"][n]["grammatical"] for n in names])
    ax.set_xlabel("share of samples that are complete grammatical programs")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(workdir / "samples.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
