"""MoE replication at toy scale: a dense decoder vs MoE decoders with the same active parameters per token.

    python experiments/moe_replication.py --out runs/moe_replication \
        [--steps 200 --arms dense,4x1,8x1,16x1,8x2,16x2,8x2-noaux --seeds 0,1 --config.KEY=VALUE]

Arms (all from experiments/configs/moe.py, overrides apply to all; each arm fits its tokenizer on the same documents
with the same tokenizer config, so all get the same tokenizer):
  dense       the dense FFN with d_ff = DENSE_FF (the config's top_k x d_ff, 256 by default)
  ExK         E experts, top-K noisy gating, each expert d_ff = DENSE_FF / K: the same active FFN parameters
  ExK-noaux   the same with every auxiliary loss coefficient set to 0 (balance ablation)
  ExK-switch  Switch routing (router "switch"; top-K probabilities as gates, balance + z loss)
The arms are one toyjax.sweep with the arms as points and --seeds as its seeds (default: the config's train.seed;
train.seed sets initialisation, batch order and router noise): every arm is trained once per seed in OUT/ARM,seed=S
(e.g. OUT/8x2-noaux,seed=0), resumably (finished runs are skipped), next to the sweep's OUT/results.csv and
OUT/results.md. With several seeds an arm's numbers are the mean over seeds, perplexity as mean ± half the range.
Reports per arm: valid perplexity, total and active parameters, expert-usage balance on validation tokens (normalised
entropy of each layer's expert shares, 1 = uniform, and the largest share), and a sample. Writes OUT/summary.json and
OUT/moe_replication.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from toyjax.cli import run_reporting_errors
from toyjax import config as config_lib
from toyjax import load_run, sweep
from toyjax.data import pipeline

CONFIG = ROOT / "experiments" / "configs" / "moe.py"
EXPERT_PARAMS = ("w_up", "b_up", "w_down", "b_down")


def parse_arm(name: str) -> dict:
    """Returns {'experts', 'top_k', 'aux', 'router'} for 'dense', 'ExK', 'ExK-noaux' or 'ExK-switch'."""
    if name == "dense":
        return {"experts": 0, "top_k": 0, "aux": True, "router": "noisy_topk"}
    head, *flags = name.split("-")
    try:
        experts, top_k = (int(v) for v in head.split("x"))
    except ValueError:
        raise SystemExit(f"error: --arms: cannot read arm {name!r}; use dense, 8x2, 8x2-noaux or 8x1-switch") from None
    if set(flags) - {"noaux", "switch"}:
        raise SystemExit(f"error: --arms: unknown flag in {name!r}; known: noaux, switch")
    return {"experts": experts, "top_k": top_k, "aux": "noaux" not in flags,
            "router": "switch" if "switch" in flags else "noisy_topk"}


def arm_point(arm: dict, dense_ff: int) -> dict:
    """Returns the sweep point (config keys to set) of an arm from parse_arm, at the dense arm's d_ff."""
    if arm["experts"] == 0:
        return {"model.ffn": "dense", "model.d_ff": dense_ff}
    if dense_ff % arm["top_k"]:
        raise SystemExit(f"error: dense d_ff {dense_ff} is not divisible by top_k {arm['top_k']}")
    point = {"model.ffn": "moe", "model.d_ff": dense_ff // arm["top_k"], "model.moe.n_experts": arm["experts"],
             "model.moe.top_k": arm["top_k"], "model.moe.router": arm["router"]}
    if not arm["aux"]:
        point.update({f"model.moe.{coef}": 0.0 for coef in ("importance_coef", "load_coef", "balance_coef",
                                                            "z_loss_coef")})
    return point


def parameter_counts(params, cfg) -> tuple[int, int]:
    """Returns (total, active per token): an MoE token uses top_k of each layer's experts."""
    total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    if cfg.model.ffn != "moe":
        return total, total
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    expert = sum(int(np.prod(v.shape)) for path, v in flat if getattr(path[-1], "key", None) in EXPERT_PARAMS)
    return total, total - expert + expert * cfg.model.moe.top_k // cfg.model.moe.n_experts


def routing_balance(run, batches) -> dict:
    """Returns per-layer normalised usage entropy and max expert share over validation tokens (deterministic)."""
    cfg = run.config.model

    @jax.jit
    def expert_indices(tokens):
        _, state = run.model.apply({"params": run.params}, tokens, mutable=["intermediates"])
        return [state["intermediates"][f"block_{i}"]["ffn"]["expert_index"][0] for i in range(cfg.n_layers)]

    counts = np.zeros((cfg.n_layers, cfg.moe.n_experts))
    for batch in batches:
        for layer, idx in enumerate(expert_indices(batch["inputs"])):
            counts[layer] += np.bincount(np.asarray(idx).reshape(-1), minlength=cfg.moe.n_experts)
    share = counts / counts.sum(1, keepdims=True)
    entropy = -np.sum(np.where(share > 0, share * np.log(np.maximum(share, 1e-12)), 0), 1) / math.log(cfg.moe.n_experts)
    return {"usage_entropy": entropy.tolist(), "max_share": share.max(1).tolist(), "shares": share.round(4).tolist()}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    dense = next((a for a in arms if a["experts"] == 0), None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for top_k, marker in ((1, "o"), (2, "s"), (4, "^")):
        group = sorted((a for a in arms if a["top_k"] == top_k and a["aux"] and a["router"] == "noisy_topk"),
                       key=lambda a: a["total_params"])
        if group:
            left.plot([a["total_params"] for a in group], [a["valid_ppl"] for a in group], marker=marker,
                      label=f"MoE top-{top_k} (active = dense)")
            for a in group:
                left.annotate(f"{a['experts']}e", (a["total_params"], a["valid_ppl"]), fontsize=8)
    for a in arms:
        if a["experts"] and (not a["aux"] or a["router"] != "noisy_topk"):
            left.scatter(a["total_params"], a["valid_ppl"], marker="x", color="gray")
            left.annotate(a["name"], (a["total_params"], a["valid_ppl"]), fontsize=8, color="gray")
    if dense:
        left.axhline(dense["valid_ppl"], color="k", ls=":", label=f"dense ({dense['total_params']:,} params)")
    left.set(xscale="log", xlabel="total parameters", ylabel="valid perplexity",
             title="equal active parameters per token")
    left.legend(fontsize=8)
    moe_arms = [a for a in arms if a["experts"]]
    x = np.arange(len(moe_arms))
    right.bar(x, [np.mean(a["usage_entropy"]) for a in moe_arms], color=["C0" if a["aux"] else "C3" for a in moe_arms])
    right.set_xticks(x, [a["name"] for a in moe_arms], rotation=30, fontsize=8)
    right.set(ylim=(0, 1.05), ylabel="expert-usage entropy / log E (1 = uniform)",
              title="routing balance on validation tokens (red: no aux loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe_arm(name: str, arm: dict, row: dict, workdir: Path, batches: list[dict]) -> dict:
    """Returns one trained arm's record (one seed) from its sweep row and workdir; batches: for routing balance."""
    run = load_run(workdir)
    total, active = parameter_counts(run.params, run.config)
    balance = routing_balance(run, batches) if arm["experts"] else {}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if r["split"] == "train"][-1]
    samples = (workdir / "samples.txt").read_text().strip().split("\n\n")
    record = {"name": name, **arm, "d_ff": run.config.model.d_ff, "seed": row["seed"], "valid_loss": row["loss"],
              "valid_ppl": row["ppl"], "total_params": total, "active_params": active,
              "train_aux_loss": last_train.get("aux_loss"), "tokens_per_s": row["tokens_per_s"],
              "seconds": row["wall_s"], "sample": samples[0], **balance}
    print(f"== {workdir.name}: valid ppl {row['ppl']:.3f}, params {total:,} total / {active:,} active"
          + (f", usage entropy {np.round(balance['usage_entropy'], 3).tolist()}" if balance else "")
          + f", trained in {row['wall_s']:.0f}s", flush=True)
    return record


def validation_batches(workdir: Path, n_batches: int) -> list[dict]:
    """Returns n_batches evenly spaced validation batches of a run, encoded with its tokenizer (all arms share it)."""
    run = load_run(workdir)
    cfg = run.config
    valid = pipeline.split_train_valid(pipeline.load_documents(cfg.data), cfg.data.valid_fraction)[1]
    return pipeline.TokenStream.encode(run.tokenizer, valid).eval_batches(
        n_batches, batch_size=cfg.train.batch_size, length=cfg.model.max_len)


def combine_seeds(runs: list[dict]) -> dict:
    """Returns one arm's record over its seeds: means, plus per-seed perplexities and half their range (spread)."""
    first, ppl = runs[0], [r["valid_ppl"] for r in runs]
    arm = {**first, "seeds": [r["seed"] for r in runs], "valid_ppl_seeds": ppl,
           "valid_ppl": float(np.mean(ppl)), "valid_ppl_spread": (max(ppl) - min(ppl)) / 2,
           "valid_loss": float(np.mean([r["valid_loss"] for r in runs])),
           "seconds": sum(r["seconds"] for r in runs)}
    arm.pop("seed")
    for key in ("train_aux_loss", "tokens_per_s"):
        values = [r[key] for r in runs if r[key] is not None]
        arm[key] = float(np.mean(values)) if values else None
    for key in ("usage_entropy", "max_share", "shares"):  # per layer (and expert): averaged over seeds
        if key in first:
            arm[key] = np.mean([r[key] for r in runs], axis=0).tolist()
    return arm


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/moe_replication", help="output folder (one workdir per arm)")
    parser.add_argument("--steps", type=int, default=0, help="training steps per arm (0 = the config's)")
    parser.add_argument("--arms", default="dense,4x1,8x1,16x1,8x2,16x2,8x2-noaux,8x1-switch")
    parser.add_argument("--seeds", default="", help="comma-separated train seeds per arm, e.g. 0,1 "
                                                    "(default: the config's train.seed)")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches for routing balance")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    base = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    if args.steps:
        base.train.steps = args.steps
        base.train.eval_every = base.train.checkpoint_every = args.steps
    seeds = sweep.parse_seeds(args.seeds) if args.seeds else [base.train.seed]
    dense_ff = base.model.d_ff * max(base.model.moe.top_k, 1) if base.model.ffn == "moe" else base.model.d_ff
    out = Path(args.out)

    names = [a for a in args.arms.split(",") if a]
    parsed = [parse_arm(name) for name in names]
    rows = sweep.run_sweep(base, [arm_point(arm, dense_ff) for arm in parsed], out, seeds=seeds, labels=names,
                           quiet=True)
    batches = validation_batches(out / rows[0]["name"], args.eval_batches)
    arms = []
    for index, (name, arm) in enumerate(zip(names, parsed)):
        arm_rows = rows[index * len(seeds):(index + 1) * len(seeds)]  # rows run points outer, seeds inner
        arms.append(combine_seeds([describe_arm(name, arm, row, out / row["name"], batches) for row in arm_rows]))

    summary = {"config": base.to_dict(), "dense_d_ff": dense_ff, "seeds": seeds, "arms": arms}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "moe_replication.png")
    dense = next((a for a in arms if a["experts"] == 0), arms[0])
    spread = len(seeds) > 1
    print(f"\n{'arm':>11s} {'valid ppl':>9s}{' ± spread' if spread else ''} {'vs dense':>8s} {'total':>9s} "
          f"{'active':>9s} {'entropy':>7s} {'max share':>9s} {'tok/s':>7s}"
          + (f"   (mean over seeds {','.join(map(str, seeds))}; spread = half the range)" if spread else ""))
    for a in arms:
        entropy = f"{np.mean(a['usage_entropy']):7.3f}" if a["experts"] else "      -"
        share = f"{np.max(a['max_share']):9.3f}" if a["experts"] else "        -"
        plus_minus = f" ± {a['valid_ppl_spread']:6.3f}" if spread else ""
        print(f"{a['name']:>11s} {a['valid_ppl']:9.3f}{plus_minus} "
              f"{a['valid_ppl'] / dense['valid_ppl'] - 1:+8.1%} {a['total_params']:9,d} {a['active_params']:9,d} "
              f"{entropy} {share} {a['tokens_per_s'] or 0:7.0f}")
    print(f"wrote {out / 'summary.json'} and {out / 'moe_replication.png'}")


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
