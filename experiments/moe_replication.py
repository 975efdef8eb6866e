"""MoE replication at toy scale: a dense decoder vs MoE decoders with the same active parameters per token.

    python experiments/moe_replication.py --out runs/moe_replication \
        [--steps 200 --arms dense,4x1,8x1,16x1,8x2,16x2,8x2-noaux --seeds 0,1 --config.KEY=VALUE]

Arms (all from experiments/configs/moe.py, overrides apply to all; the tokenizer is fitted once and copied):
  dense       the dense FFN with d_ff = DENSE_FF (the config's top_k x d_ff, 256 by default)
  ExK         E experts, top-K noisy gating, each expert d_ff = DENSE_FF / K: the same active FFN parameters
  ExK-noaux   the same with every auxiliary loss coefficient set to 0 (balance ablation)
  ExK-switch  Switch routing (router "switch"; top-K probabilities as gates, balance + z loss)
With several --seeds every arm is trained once per seed (train.seed: initialisation, batch order, router noise) in
OUT/ARM-seedS, and its numbers are the mean over seeds, perplexity as mean ± half the range (min to max); with one
seed (the default: the config's) an arm's workdir is OUT/ARM.
Reports per arm: valid perplexity, total and active parameters, expert-usage balance on validation tokens (normalised
entropy of each layer's expert shares, 1 = uniform, and the largest share), and a sample. Writes OUT/summary.json and
OUT/moe_replication.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from toyjax import config as config_lib
from toyjax import load_run, train
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
        raise SystemExit(f"--arms: cannot read arm {name!r}; use dense, 8x2, 8x2-noaux or 8x1-switch") from None
    if set(flags) - {"noaux", "switch"}:
        raise SystemExit(f"--arms: unknown flag in {name!r}; known: noaux, switch")
    return {"experts": experts, "top_k": top_k, "aux": "noaux" not in flags,
            "router": "switch" if "switch" in flags else "noisy_topk"}


def arm_config(base: config_lib.Config, arm: dict, dense_ff: int) -> config_lib.Config:
    cfg = config_lib.from_dict(base.to_dict())
    if arm["experts"] == 0:
        cfg.model.ffn, cfg.model.d_ff = "dense", dense_ff
        return cfg
    if dense_ff % arm["top_k"]:
        raise SystemExit(f"dense d_ff {dense_ff} is not divisible by top_k {arm['top_k']}")
    cfg.model.ffn, cfg.model.d_ff = "moe", dense_ff // arm["top_k"]
    moe = cfg.model.moe
    moe.n_experts, moe.top_k, moe.router = arm["experts"], arm["top_k"], arm["router"]
    if not arm["aux"]:
        moe.importance_coef = moe.load_coef = moe.balance_coef = moe.z_loss_coef = 0.0
    return cfg


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


def train_arm(name: str, arm: dict, cfg: config_lib.Config, workdir: Path, eval_batches: int,
              shared: dict) -> dict:
    """Returns one trained arm's record; shared carries the fitted tokenizer folder and the validation batches."""
    if shared.get("tokenizer") is not None and not (workdir / "tokenizer").exists():
        shutil.copytree(shared["tokenizer"], workdir / "tokenizer")  # same tokens for every arm
    start = time.perf_counter()
    print(f"== {workdir.name}: {cfg.train.steps} steps, ffn {cfg.model.ffn}, d_ff {cfg.model.d_ff}, "
          f"seed {cfg.train.seed}", flush=True)
    result = train.run(cfg, workdir, quiet=True)
    shared["tokenizer"] = shared.get("tokenizer") or workdir / "tokenizer"
    run = load_run(workdir)
    if shared.get("batches") is None:
        docs = pipeline.load_documents(run.config.data)
        valid = pipeline.split_train_valid(docs, run.config.data.valid_fraction)[1]
        shared["batches"] = pipeline.TokenStream.encode(run.tokenizer, valid).eval_batches(
            eval_batches, batch_size=cfg.train.batch_size, length=cfg.model.max_len)
    total, active = parameter_counts(run.params, run.config)
    balance = routing_balance(run, shared["batches"]) if arm["experts"] else {}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if r["split"] == "train"][-1]
    samples = (workdir / "samples.txt").read_text().strip().split("\n\n")
    record = {"name": name, **arm, "d_ff": cfg.model.d_ff, "seed": cfg.train.seed, "valid_loss": result["loss"],
              "valid_ppl": result["ppl"], "total_params": total, "active_params": active,
              "train_aux_loss": last_train.get("aux_loss"), "tokens_per_s": result.get("tokens_per_s"),
              "seconds": time.perf_counter() - start, "sample": samples[0], **balance}
    print(f"   valid ppl {result['ppl']:.3f}, params {total:,} total / {active:,} active"
          + (f", usage entropy {np.round(balance['usage_entropy'], 3).tolist()}" if balance else "")
          + f", {record['seconds']:.0f}s", flush=True)
    return record


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


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: cannot read {text!r}; use comma-separated integers such as 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: give distinct integers such as 0,1, got {text!r}")
    return seeds


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
    seeds = parse_seeds(args.seeds) if args.seeds else [base.train.seed]
    dense_ff = base.model.d_ff * max(base.model.moe.top_k, 1) if base.model.ffn == "moe" else base.model.d_ff
    out = Path(args.out)

    arms, shared = [], {}
    for name in [a for a in args.arms.split(",") if a]:
        arm = parse_arm(name)
        runs = []
        for seed in seeds:
            cfg = arm_config(base, arm, dense_ff)
            cfg.train.seed = seed
            workdir = out / name if len(seeds) == 1 else out / f"{name}-seed{seed}"
            runs.append(train_arm(name, arm, cfg, workdir, args.eval_batches, shared))
        arms.append(combine_seeds(runs))

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
    main()
