"""Top-k attention sweep: dense and top-k decoders (k in {1, 2, 4, 8, 16, 32}) on one tokenization and budget.

    python experiments/topk_attention.py --out runs/topk_attention [--steps 300 --ks 1,2,4,8 --config.KEY=VALUE]

Every arm uses experiments/configs/topk.py (overrides apply to all arms) and differs only in model.attention
("dense") or model.attention_top_k. The arms are one toyjax.sweep (resumable: finished arms are skipped) into
OUT/dense,seed=S and OUT/k1,seed=S, OUT/k2,seed=S, ... (S: the config's train.seed), plus the sweep's
OUT/results.csv and OUT/results.md. Each arm fits its top-word tokenizer on the same documents with the same
tokenizer config, which gives the same tokenizer, so all see exactly the same tokens, windows and step budget.
Reports per arm:
  * valid perplexity (toyjax.train.run on train.eval_batches batches of the held-out split; every other
    number below is measured on those same batches),
  * attention entropy in nats, per layer, averaged over heads and validation queries: from the kept top-k
    weights the decoder sows under 'intermediates' (dense: from its full attention weights),
  * for the dense model only: the share of its attention mass on its own top-k keys, and its perplexity when
    top-k attention is swapped in at inference without retraining (what training with top-k buys),
  * a sample from each model.
Writes OUT/summary.json and OUT/topk_attention.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from toyjax.cli import run_reporting_errors
from toyjax import config as config_lib
from toyjax import load_run, sweep, train
from toyjax.data import run_data
from toyjax.models.decoder import Decoder

CONFIG = ROOT / "experiments" / "configs" / "topk.py"


def arm_point(top_k: int | None) -> dict:
    """Returns the sweep point (config keys to set) of the dense arm (top_k None) or a top-k arm."""
    if top_k is None:
        return {"model.attention": "dense"}
    return {"model.attention": "topk", "model.attention_top_k": top_k}


def arm_config(base: config_lib.Config, top_k: int | None) -> config_lib.Config:
    """Returns a copy of base with the arm's keys set."""
    cfg = config_lib.from_dict(base.to_dict())
    for key, value in arm_point(top_k).items():
        config_lib.set_key(cfg, key, value)
    return cfg


def entropies(model, params, batches) -> list[float]:
    """Returns the mean attention entropy (nats) of each layer over heads and validation queries."""

    @jax.jit
    def layer_entropies(tokens):
        _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
        out = []
        for i in range(model.cfg.n_layers):
            sown = state["intermediates"][f"block_{i}"]["attention"]
            weights = sown["topk_weights"][0] if "topk_weights" in sown else sown["attention_weights"][0]
            out.append(-jnp.sum(jnp.where(weights > 0, weights * jnp.log(jnp.maximum(weights, 1e-30)), 0.0), -1).mean())
        return jnp.stack(out)

    return np.mean([np.asarray(layer_entropies(b["inputs"])) for b in batches], axis=0).tolist()


def dense_topk_mass(model, params, batches, ks) -> dict[int, float]:
    """Returns, for each k, the dense model's mean attention mass on its own k largest weights."""

    @jax.jit
    def sorted_weights(tokens):
        _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
        layers = [state["intermediates"][f"block_{i}"]["attention"]["attention_weights"][0]
                  for i in range(model.cfg.n_layers)]
        return -jnp.sort(-jnp.stack(layers), axis=-1)  # [layers, b, h, q, k] descending

    weights = [np.asarray(sorted_weights(b["inputs"])) for b in batches]
    return {k: float(np.mean([np.cumsum(w, -1)[..., min(k, w.shape[-1]) - 1].mean() for w in weights])) for k in ks}


def swapped_perplexity(cfg, params, batches, grammar, top_k: int) -> float:
    """Returns the valid perplexity of dense-trained params run with top-k attention (no retraining).

    Scored as train.run scores the dense run (same batches, the run's grammar tables and loss), attention aside.
    """
    swapped = arm_config(cfg, top_k)
    eval_step = jax.jit(train.make_eval_step(Decoder(swapped.model), swapped, grammar))
    return train.evaluate(eval_step, params, batches)["ppl"]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in summary["arms"] if a["top_k"] is not None]
    dense = next(a for a in summary["arms"] if a["top_k"] is None)
    ks = [a["top_k"] for a in arms]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ks, [a["valid_ppl"] for a in arms], marker="o", label="trained with top-k")
    left.plot(ks, [summary["dense_swapped_ppl"][str(k)] for k in ks], marker="x", ls="--",
              label="dense-trained, top-k at inference")
    left.axhline(dense["valid_ppl"], color="k", ls=":", label="dense")
    left.set(xscale="log", xlabel="k (keys kept per query)", ylabel="valid perplexity", title="perplexity vs k")
    left.set_xticks(ks, [str(k) for k in ks])
    left.legend()
    right.plot(ks, [np.mean(a["attention_entropy"]) for a in arms], marker="o", label="top-k model (kept weights)")
    right.plot(ks, np.log(ks), ls="--", color="gray", label="log k (uniform over k)")
    right.axhline(np.mean(dense["attention_entropy"]), color="k", ls=":", label="dense model")
    right.set(xscale="log", xlabel="k", ylabel="attention entropy (nats, mean over layers)", title="entropy vs k")
    right.set_xticks(ks, [str(k) for k in ks])
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/topk_attention", help="output folder (one workdir per arm)")
    parser.add_argument("--steps", type=int, default=0, help="training steps per arm (0 = the config's)")
    parser.add_argument("--ks", default="1,2,4,8,16,32", help="comma-separated top-k values")
    parser.add_argument("--config", default=str(CONFIG))
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    base = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    if args.steps:
        base.train.steps = args.steps
        base.train.eval_every = base.train.checkpoint_every = args.steps
    ks = sorted({int(k) for k in args.ks.split(",") if k})
    out = Path(args.out)

    top_ks = [None] + ks
    names = ["dense" if top_k is None else f"k{top_k}" for top_k in top_ks]
    rows = sweep.run_sweep(base, [arm_point(top_k) for top_k in top_ks], out, seeds=[base.train.seed],
                           labels=names, quiet=True)
    arms = []
    for name, top_k, row in zip(names, top_ks, rows):
        workdir = out / row["name"]
        run = load_run(workdir)
        # The very batches (and grammar) train.run scored, so every perplexity in the table is on the same tokens.
        batches, grammar = run_data.validation_batches(run.config, run.tokenizer)
        samples = (workdir / "samples.txt").read_text().strip().split("\n\n")
        arms.append({
            "name": name, "workdir": row["name"], "top_k": top_k, "valid_loss": row["loss"], "valid_ppl": row["ppl"],
            "valid_accuracy": row["accuracy"], "tokens_per_s": row["tokens_per_s"],
            "attention_entropy": entropies(run.model, run.params, batches), "sample": samples[0],
            "seconds": row["wall_s"],
        })
        print(f"== {name}: valid ppl {row['ppl']:.3f}, entropy per layer "
              f"{[round(e, 2) for e in arms[-1]['attention_entropy']]}, trained in {row['wall_s']:.0f}s", flush=True)
        if top_k is None:
            dense_run, dense_batches, dense_grammar = run, batches, grammar

    summary = {
        "config": base.to_dict(), "arms": arms,
        "dense_topk_mass": {str(k): v for k, v in dense_topk_mass(dense_run.model, dense_run.params, dense_batches, ks).items()},
        "dense_swapped_ppl": {str(k): swapped_perplexity(dense_run.config, dense_run.params, dense_batches,
                                                    dense_grammar, k) for k in ks},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "topk_attention.png")

    dense = arms[0]
    print(f"\n{'arm':>6s} {'valid ppl':>9s} {'vs dense':>8s} {'entropy':>8s} {'dense mass@k':>12s} "
          f"{'dense+topk@inference ppl':>24s}  sample")
    for arm in arms:
        k = arm["top_k"]
        mass = f"{summary['dense_topk_mass'][str(k)]:.3f}" if k else "1.000"
        swapped = f"{summary['dense_swapped_ppl'][str(k)]:.3f}" if k else f"{dense['valid_ppl']:.3f}"
        print(f"{arm['name']:>6s} {arm['valid_ppl']:9.3f} {arm['valid_ppl'] / dense['valid_ppl'] - 1:+8.1%} "
              f"{np.mean(arm['attention_entropy']):8.2f} {mass:>12s} {swapped:>24s}  {arm['sample'][:70]!r}")
    print(f"wrote {out / 'summary.json'} and {out / 'topk_attention.png'}")


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
