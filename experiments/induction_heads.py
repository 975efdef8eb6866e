"""Induction heads found with toyjax.interp alone: a 2-layer attention-only decoder on repeated random tokens.

    python experiments/induction_heads.py --out runs/induction_heads [--config.KEY=VALUE ...] [--rule-share 0.5]

Trains the decoder of experiments/configs/induction_heads.py on fresh rows every step (RowSettings), then looks at
every head of the trained model on held-out analysis rows (a random prefix, then a random segment of `--half`
distinct tokens twice) with four measures, each a [layer, head] table:

  previous   attention from each position to the one before it (mean over positions)
  induction  attention from each token of the second copy to the token after its earlier occurrence
  ablation   how much zeroing the head's output (attn.hook_z, run_with_hooks) raises the loss on the second copy
  noising    the share of the clean-to-corrupted drop in the second copy's log-probability that this head alone
             causes when its output comes from a corrupted run whose first copy is fresh tokens
             (patch_activation with the roles of clean and corrupted swapped)

The previous-token head is layer 0's head with the highest previous score, the induction head layer 1's with the
highest induction score; the findings say whether ablation and noising rank the same two heads first in their
layers. Writes OUT/findings.json, OUT/findings.md and OUT/{attention,ablation,noising}.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from toyjax import config as config_lib, interp, train
from toyjax.cli import run_reporting_errors
from toyjax.config import ConfigError
from toyjax.interp import views
from toyjax.interp.hooked import model_and_variables
from toyjax.models.decoder import Decoder, init_params

CONFIG = Path(__file__).resolve().parent / "configs" / "induction_heads.py"


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """The training rows: repeated random segments, plus a share of rows that follow a previous-token rule."""

    repeat_min: int = 4  # length of the repeated segment, drawn per row in [repeat_min, repeat_max]
    repeat_max: int = 16  # at most max_len // 2
    rule_share: float = 0.5  # share of rows where token t + 1 repeats token t - 1 (with chance rule_keep)
    rule_keep: float = 0.7  # elsewhere in those rows the token is random


def repeated_rows(rng: np.random.Generator, batch: int, length: int, vocab: int, lo: int, hi: int) -> np.ndarray:
    """Returns [batch, length] random tokens in which a segment of h in [lo, hi] distinct tokens appears twice, back
    to back, at a random start."""
    rows = rng.integers(0, vocab, (batch, length))
    for row in rows:
        h = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, length - 2 * h + 1))
        row[start:start + h] = row[start + h:start + 2 * h] = rng.permutation(vocab)[:h]
    return rows


def rule_rows(rng: np.random.Generator, batch: int, length: int, vocab: int, keep: float) -> np.ndarray:
    """Returns [batch, length] random rows where each token from the third on repeats the token two back with
    chance keep: the token before the current one predicts the next, as a previous-token head can tell."""
    rows = rng.integers(0, vocab, (batch, length))
    repeats = rng.random((batch, length)) < keep
    for t in range(2, length):
        rows[:, t] = np.where(repeats[:, t], rows[:, t - 2], rows[:, t])
    return rows


def training_rows(rng: np.random.Generator, batch: int, length: int, vocab: int, settings: RowSettings) -> np.ndarray:
    """Returns one training batch [batch, length] (repeated rows, then rule rows)."""
    n_rule = int(round(batch * settings.rule_share))
    return np.concatenate([repeated_rows(rng, batch - n_rule, length, vocab, settings.repeat_min, settings.repeat_max),
                           rule_rows(rng, n_rule, length, vocab, settings.rule_keep)]).astype(np.int32)


def analysis_rows(seed: int, batch: int, length: int, vocab: int, half: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (clean, corrupted, start): clean = random prefix, segment, segment (the second copy at `start`);
    corrupted = the same with the first copy replaced by other tokens, so the second copy is not predictable."""
    rng = np.random.default_rng(seed)
    start = length - half
    clean = rng.integers(0, vocab, (batch, length))
    corrupted = clean.copy()
    for c, x in zip(clean, corrupted):
        order = rng.permutation(vocab)
        c[start - half:start] = c[start:] = x[start:] = order[:half]
        x[start - half:start] = order[half:2 * half]
    return clean.astype(np.int32), corrupted.astype(np.int32), start


def train_model(cfg: config_lib.Config, settings: RowSettings, *, quiet: bool = False):
    """Returns ((model, params), per-step losses) after cfg.train.steps steps, each on a fresh training batch."""
    model = Decoder(cfg.model)
    params = init_params(model, cfg.train.seed)
    tx = train.make_optimizer(cfg.train)
    opt_state = tx.init(params)
    step = jax.jit(train.make_train_step(model, cfg, tx), donate_argnums=(0, 1))
    rng = np.random.default_rng(cfg.train.seed + 1)
    losses = []
    for i in range(cfg.train.steps):
        rows = training_rows(rng, cfg.train.batch_size, cfg.model.max_len + 1, cfg.model.vocab_size, settings)
        params, opt_state, metrics = step(params, opt_state, {"inputs": rows[:, :-1], "targets": rows[:, 1:]},
                                          train.step_key(cfg.train.seed, i))
        losses.append(metrics["loss"])
        if not quiet and (i + 1) % 500 == 0:
            print(f"step {i + 1}: loss {float(metrics['loss']):.3f}", file=sys.stderr, flush=True)
    return (model, params), [float(x) for x in losses]


def second_copy_log_prob(clean: np.ndarray, start: int):
    """Returns a metric: mean log-prob of the right next token where the first copy makes it predictable."""
    targets = jnp.asarray(clean[:, start + 1:])  # predicted from positions start .. length - 2

    def metric(logits):
        log_probs = jax.nn.log_softmax(logits[:, start:-1].astype(jnp.float32), axis=-1)
        return jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

    return metric


def head_scores(run, clean: np.ndarray, corrupted: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """Returns the four [layer, head] measures of the docstring on the analysis rows."""
    cfg = run[0].cfg
    half = clean.shape[1] - start
    patterns = views.attention_patterns(run, clean)  # [layer, batch, head, query, key]
    position = np.arange(1, clean.shape[1])
    previous = patterns[..., position, position - 1].mean((1, 3))
    query = np.arange(start, clean.shape[1])
    induction = patterns[..., query, query - half + 1].mean((1, 3))
    # The offset (query - key) each head attends to most often from the second copy; the induction target is half - 1.
    offsets = query - patterns[..., query, :].argmax(-1)  # [layer, batch, head, query]
    offset = np.apply_along_axis(lambda o: np.bincount(o, minlength=clean.shape[1]).argmax(), 1,
                                 offsets.transpose(0, 2, 1, 3).reshape(-1, offsets.shape[1] * len(query)))

    metric = second_copy_log_prob(clean, start)

    def loss(keep):  # keep: [layer, head]; 0 zeroes that head's output
        hooks = {f"blocks.{layer}.attn.hook_z": lambda z, layer=layer: z * keep[layer][:, None]
                 for layer in range(cfg.n_layers)}
        return -metric(interp.run_with_hooks(run, clean, hooks))

    one_zeroed = 1.0 - jnp.eye(cfg.n_layers * cfg.n_heads).reshape(-1, cfg.n_layers, cfg.n_heads)
    ablation = jax.jit(jax.vmap(loss))(one_zeroed) - jax.jit(loss)(jnp.ones((cfg.n_layers, cfg.n_heads)))
    # Noising: the corrupted run's head output patched into the clean run (clean and corrupted swapped), so
    # `recovered` is the share of the clean-to-corrupted drop that one head causes.
    noising = interp.patch_activation(run, corrupted, clean, metric, "attn.hook_z", index="head").recovered
    return {"previous": previous, "induction": induction, "offset": offset.reshape(previous.shape),
            "ablation": np.asarray(ablation).reshape(cfg.n_layers, cfg.n_heads), "noising": np.asarray(noising)}


def find_heads(scores: dict[str, np.ndarray]) -> dict:
    """Returns the previous-token and induction heads by attention, and whether ablation and noising agree."""
    previous_head = [0, int(np.argmax(scores["previous"][0]))]
    induction_head = [1, int(np.argmax(scores["induction"][1]))]
    agree = {measure: bool(int(np.argmax(scores[measure][0])) == previous_head[1]
                           and int(np.argmax(scores[measure][1])) == induction_head[1])
             for measure in ("ablation", "noising")}
    return {"previous_token_head": previous_head, "induction_head": induction_head, "agree": agree}


def copy_losses(run, clean: np.ndarray, start: int) -> dict[str, float]:
    """Returns the mean loss (nats) on the second copy's predictable tokens and on the random prefix."""
    model, variables = model_and_variables(run)
    logits = model.apply(variables, jnp.asarray(clean))
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))),
                              clean[:, 1:, None], -1)[..., 0]
    half = clean.shape[1] - start
    return {"second_copy": float(nll[:, start:].mean()), "prefix": float(nll[:, :start - half - 1].mean())}


def table(scores: dict[str, np.ndarray], heads: dict) -> list[str]:
    """Returns the findings' Markdown table: a row per head, a column per measure, the two found heads marked."""
    lines = ["| head | previous | induction | main offset | ablation (nats) | noising (share) |",
             "|---|---|---|---|---|---|"]
    n_layers, n_heads = scores["previous"].shape
    for layer in range(n_layers):
        for head in range(n_heads):
            mark = {tuple(heads["previous_token_head"]): " (previous-token)",
                    tuple(heads["induction_head"]): " (induction)"}.get((layer, head), "")
            cells = [f"{scores[m][layer, head]:.3f}" for m in ("previous", "induction")]
            cells += [str(int(scores["offset"][layer, head]))]
            cells += [f"{scores[m][layer, head]:.3f}" for m in ("ablation", "noising")]
            lines.append(f"| {layer}.{head}{mark} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(out: Path, run, scores, heads, losses, clean, start, summary) -> None:
    (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(run[1]))
    patterns = views.attention_patterns(run, clean[:1])[:, 0]
    labels = [str(t) for t in clean[0]]
    chosen = [tuple(heads["previous_token_head"]), tuple(heads["induction_head"])]
    views.plot_attention(patterns, labels, out / "attention.png", heads=chosen,
                         title="previous-token head and induction head, one analysis row")
    for measure in ("ablation", "noising"):
        interp.plot_patching(scores[measure], out / f"{measure}.png", title=measure, xlabel="head")
    (out / "findings.json").write_text(json.dumps({
        **summary, **heads, "losses": losses,
        "scores": {k: np.round(v, 6).tolist() for k, v in scores.items()}}, indent=1))
    agree = ", ".join(f"{m}: {'yes' if ok else 'no'}" for m, ok in heads["agree"].items())
    (out / "findings.md").write_text("\n".join([
        "# Induction heads", "",
        f"{summary['steps']} steps, seed {summary['seed']}, {summary['train_seconds']:.0f} s of training. "
        f"Loss on the second copy {losses['second_copy']:.3f} nats, on the random prefix {losses['prefix']:.3f} "
        f"(ln vocab = {np.log(summary['vocab_size']):.3f}).", "",
        f"Previous-token head {heads['previous_token_head'][0]}.{heads['previous_token_head'][1]}, induction head "
        f"{heads['induction_head'][0]}.{heads['induction_head'][1]}; ranked first in their layers by {agree}.", "",
        *table(scores, heads), ""]))


def run_experiment(argv: list[str]) -> dict:
    """Trains, measures every head and writes OUT; returns the findings."""
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="experiments/induction_heads.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/induction_heads")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--half", type=int, default=12, help="analysis rows: length of the repeated segment")
    parser.add_argument("--rule-share", type=float, default=RowSettings.rule_share)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    cfg = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    settings = RowSettings(repeat_max=min(RowSettings.repeat_max, cfg.model.max_len // 2), rule_share=args.rule_share)
    checks = [
        (2 <= args.half <= cfg.model.max_len // 2,
         f"--half={args.half} must be in [2, model.max_len // 2 = {cfg.model.max_len // 2}]"),
        (0 <= args.rule_share < 1, f"--rule-share={args.rule_share} must be in [0, 1)"),
        (cfg.model.ffn == "none" and cfg.model.n_layers == 2,
         f"model.ffn={cfg.model.ffn!r}, model.n_layers={cfg.model.n_layers}: this experiment needs an "
         "attention-only decoder (model.ffn='none') with 2 layers"),
        (cfg.model.vocab_size >= 2 * args.half,
         f"model.vocab_size={cfg.model.vocab_size} must be >= 2 * --half = {2 * args.half}"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError(problems[0])
    out = Path(args.out)
    started = time.perf_counter()
    run, _ = train_model(cfg, settings, quiet=args.quiet)
    seconds = time.perf_counter() - started
    clean, corrupted, start = analysis_rows(cfg.train.seed + 100, 32, cfg.model.max_len, cfg.model.vocab_size,
                                            args.half)
    scores = head_scores(run, clean, corrupted, start)
    heads = find_heads(scores)
    losses = copy_losses(run, clean, start)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"steps": cfg.train.steps, "seed": cfg.train.seed, "vocab_size": cfg.model.vocab_size,
               "train_seconds": seconds, "settings": dataclasses.asdict(settings)}
    write_outputs(out, run, scores, heads, losses, clean, start, summary)
    if not args.quiet:
        print((out / "findings.md").read_text())
    return {**heads, "scores": scores, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    return run_reporting_errors(run_experiment, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
