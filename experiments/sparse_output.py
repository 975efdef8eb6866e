"""Sparse output representation: only grammar-valid tokens, in sampling, in the loss and in the inputs.

    python experiments/sparse_output.py --workdir runs/sparse_output [--config.train.steps=1000 ...]
    python experiments/sparse_output.py --workdir runs/sparse_output_quick --quick     # a smoke run

Four variants on the same structured data (experiments/configs/sparse_output.py) and the same step budget:
  plain                   train.loss="full", sampled freely
  plain+constrained       the same trained params, sampled with invalid tokens masked at every step
  valid_subset            train.loss="valid_subset" (invalid logits masked before the log-softmax), constrained
  valid_subset+state      the same plus model.grammar_state_embedding (grammar features added to the inputs)
Every saved checkpoint is re-scored here exactly as train.run scores it (its validation batches, the run's own
grammar tables from run_data.run_grammar, train's eval step: loss/ppl/accuracy equal train.run's), plus the same
measures for all arms, so curves compare like with like:
  * valid-restricted perplexity: softmax over the tokens the grammar allows (what constrained sampling draws from)
  * full perplexity: softmax over the whole vocabulary (meaningless for the valid-subset arms, shown to see it)
  * invalid mass: probability the full softmax puts on forbidden tokens ("what the model puts there"), at the
    positions where the grammar forbids any
The three trained arms are one toyjax.sweep (resumable: finished arms are skipped) into WORKDIR/plain,seed=S,
WORKDIR/valid_subset,seed=S and WORKDIR/valid_subset+state,seed=S (S: the config's train.seed), next to the sweep's
WORKDIR/results.csv and results.md. Writes WORKDIR/summary.json, WORKDIR/curves.png, WORKDIR/samples.png and
prints a table.
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

from toyjax.cli import run_reporting_errors
from toyjax import config as config_lib
from toyjax import grammar as grammar_lib
from toyjax import load_run, sweep, train
from toyjax.data import run_data
from toyjax.checkpoints import Checkpoints
from toyjax.sample import cut_at_eos, sample

CONFIG = ROOT / "experiments" / "configs" / "sparse_output.py"
ARMS = {  # trained arm -> its sweep point
    "plain": {"train.loss": "full", "model.grammar_state_embedding": False},
    "valid_subset": {"train.loss": "valid_subset", "model.grammar_state_embedding": False},
    "valid_subset+state": {"train.loss": "valid_subset", "model.grammar_state_embedding": True},
}


def make_checkpoint_scorer(run, grammar):
    """Returns score(params, batches) -> train.run's own validation measures plus the measures shared by all arms.

    loss, ppl, accuracy: train's eval step with the arm's own loss, exactly what train.run reports for the step.
    Then, the same for every arm, on the same batches, grammar masks and state features as training:
      restricted_ppl      softmax over the tokens the grammar allows (what constrained sampling draws from)
      full_ppl            softmax over the whole vocabulary
      invalid_mass        full-softmax probability on forbidden tokens, at positions where the grammar forbids any
      top_invalid_tokens  share of those positions where each token is the largest forbidden logit (top 5)
    grammar: run_data.run_grammar's tables for the run (the batches carry its states), never a separately compiled one.
    """
    eval_step = jax.jit(train.make_eval_step(run.model, run.config, grammar))

    @jax.jit
    def comparison_sums(params, batch):
        valid, features = train.model_inputs(batch, grammar)
        logits = run.model.apply({"params": params}, batch["inputs"], state_features=features, deterministic=True)
        restricted = train.cross_entropy(logits, batch["targets"], valid)
        full = train.cross_entropy(logits, batch["targets"])
        constrained = ~valid.all(-1)  # [batch, length]: the grammar forbids some token here
        invalid = grammar_lib.invalid_probability(logits, valid)
        top_invalid = jnp.argmax(jnp.where(valid, -jnp.inf, logits), axis=-1)
        return (restricted.sum(), full.sum(), (invalid * constrained).sum(), constrained.sum(),
                jnp.where(constrained, top_invalid, -1))

    def score(params, batches) -> dict:
        measures = train.evaluate(eval_step, params, batches)
        totals, top_counts = np.zeros(4), collections.Counter()
        for batch in batches:
            *sums, top = jax.device_get(comparison_sums(params, batch))
            totals += np.array([float(x) for x in sums])
            top_counts.update(t for t in np.asarray(top).ravel().tolist() if t >= 0)
        n_tokens, n_constrained = measures["tokens"], max(totals[3], 1)
        top_invalid = {run.tokenizer.vocab[t]: round(float(c / n_constrained), 3) for t, c in top_counts.most_common(5)}
        return {**measures, "restricted_ppl": float(np.exp(totals[0] / n_tokens)),
                "full_ppl": float(np.exp(totals[1] / n_tokens)), "invalid_mass": float(totals[2] / n_constrained),
                "top_invalid_tokens": top_invalid}

    return score


def checkpoint_scoring(workdir: Path):
    """Returns (the run's latest checkpoint, the validation batches and grammar train.run scored it with, scorer)."""
    run = load_run(workdir)
    batches, grammar = run_data.validation_batches(run.config, run.tokenizer)  # each arm fits its own tokenizer
    return run, batches, grammar, make_checkpoint_scorer(run, grammar)


def grammatical_share(run, tables, *, constrained: bool, n: int, seed: int = 0) -> dict:
    """Samples n documents from the <eos> prompt; returns the share that are complete, grammatical programs.

    tables: the run's grammar (run_data.run_grammar); on the structured domain every document must be a program, so a
    constrained sample must start one ("calc").
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
    rows = sweep.run_sweep(base, list(ARMS.values()), workdir, seeds=[base.train.seed], labels=list(ARMS),
                           quiet=False)
    arm_dirs = {arm: workdir / row["name"] for arm, row in zip(ARMS, rows)}
    for arm, row in zip(ARMS, rows):
        summary["arms"][arm] = {"workdir": row["name"], "final_train_run": {
            "loss": row["loss"], "ppl": row["ppl"], "accuracy": row["accuracy"], "tokens_per_s": row["tokens_per_s"],
            "step": row["steps"]}}

    tokens_per_step = base.train.batch_size * base.model.max_len
    for arm in ARMS:
        steps = Checkpoints(arm_dirs[arm] / "checkpoints", read_only=True).steps()
        last, batches, grammar, score = checkpoint_scoring(arm_dirs[arm])
        summary["grammar"] = {"states": int(grammar.valid.shape[0]), "vocab_size": last.tokenizer.vocab_size}
        curve = []
        for step in steps:
            params = last.params if step == last.step else load_run(arm_dirs[arm], step).params
            curve.append({"step": step, "tokens": step * tokens_per_step, **score(params, batches)})
        print(f"{arm:20s} " + "  ".join(f"{c['step']}:{c['restricted_ppl']:.3f}" for c in curve), flush=True)
        summary["arms"][arm]["curve"] = curve
        summary["arms"][arm]["final"] = curve[-1]
    variants = {"plain": ("plain", False), "plain+constrained": ("plain", True),
                "valid_subset": ("valid_subset", True), "valid_subset+state": ("valid_subset+state", True),
                "valid_subset (unconstrained, for reference)": ("valid_subset", False)}
    summary["sampling"] = {}
    for name, (arm, constrained) in variants.items():
        run = load_run(arm_dirs[arm])
        grammar = run_data.run_grammar(run.config, run.tokenizer)
        summary["sampling"][name] = grammatical_share(run, grammar, constrained=constrained, n=args.samples)
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
    sys.exit(run_reporting_errors(main))
