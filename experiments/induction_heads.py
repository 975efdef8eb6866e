"""Induction heads found with toyjax.interp alone: a 2-layer attention-only decoder on repeated random tokens.

    python experiments/induction_heads.py --out runs/induction_heads [--config.KEY=VALUE ...] [--keep 0.8]

Trains the decoder of experiments/configs/induction_heads.py on fresh rows every step (successor_rows: each row
follows its own random successor map, so the next token is the one that followed the current token earlier in the
row), then looks at every head of the trained model on held-out analysis rows (a random prefix, then a random segment
of `--half` distinct tokens twice) with four measures, each a [layer, head] table:

  previous   attention from each position to the one before it (mean over positions)
  induction  attention from each token of the second copy to the token after its earlier occurrence
  ablation   how much zeroing the head's output (attn.hook_z, run_with_hooks) raises the loss on the second copy
  noising    the share of the clean-to-corrupted drop in the second copy's log-probability that this head alone
             causes when its output comes from a corrupted run whose first copy is fresh tokens
             (patch_activation with the roles of clean and corrupted swapped)
and, for each layer-0 head, through which of layer 1's queries, keys and values it acts (composition_scores: path
noising, as in the "composition" of Elhage et al. 2021).

Attention alone picks the previous-token heads (layer 0) and the induction heads (layer 1) (find_heads); the
findings say whether ablation and noising rank one of those first in each layer. Writes OUT/findings.json,
OUT/findings.md and OUT/{attention,ablation,noising}.png.
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
    """The training rows: each row walks its own random successor map over a few symbols (see successor_rows)."""

    symbols_min: int = 8  # symbols per row, drawn per row in [symbols_min, symbols_max] from the vocabulary
    symbols_max: int = 16
    keep: float = 0.8  # chance that the next token is the current token's successor; else a random row symbol


def successor_rows(rng: np.random.Generator, batch: int, length: int, vocab: int, settings: RowSettings) -> np.ndarray:
    """Returns [batch, length] int32 rows, each over its own n in [symbols_min, symbols_max] symbols of the
    vocabulary with its own random successor (a permutation of them): each next token is the current token's
    successor with chance `keep`, else a random one of the row's symbols. The successor is visible only in context
    (the token that followed an earlier occurrence of the current token), so only copying from context predicts it.
    """
    n = rng.integers(settings.symbols_min, settings.symbols_max + 1, batch)  # symbols per row
    symbols = np.argsort(rng.random((batch, vocab)), axis=1)[:, :settings.symbols_max]
    # A random permutation of 0 .. n-1 per row: sort random keys, with the slots >= n pushed to the end.
    slot = np.arange(settings.symbols_max)
    successor = np.argsort(np.where(slot < n[:, None], rng.random((batch, settings.symbols_max)), 2.0), axis=1)
    state = np.floor(rng.random(batch) * n).astype(np.int64)
    rows = np.empty((batch, length), np.int64)
    rows_index = np.arange(batch)
    for t in range(length):
        rows[:, t] = symbols[rows_index, state]
        follow = rng.random(batch) < settings.keep
        state = np.where(follow, successor[rows_index, state], np.floor(rng.random(batch) * n).astype(np.int64))
    return rows.astype(np.int32)


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
        rows = successor_rows(rng, cfg.train.batch_size, cfg.model.max_len + 1, cfg.model.vocab_size, settings)
        params, opt_state, metrics = step(params, opt_state, {"inputs": rows[:, :-1], "targets": rows[:, 1:]},
                                          train.step_key(cfg.train.seed, i))
        losses.append(metrics["loss"])
        if not quiet and (i + 1) % 500 == 0:
            print(f"step {i + 1}: loss {float(metrics['loss']):.3f}", file=sys.stderr, flush=True)
    return (model, params), [float(x) for x in losses]


def next_token_log_probs(logits, tokens):
    """Returns [batch, length - 1] log-probs of each next token (tokens[:, 1:]) under logits[:, :-1]."""
    log_probs = jax.nn.log_softmax(jnp.asarray(logits)[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]


def second_copy_log_prob(clean: np.ndarray, start: int):
    """Returns a metric: mean log-prob of the right next token where the first copy makes it predictable."""
    return lambda logits: jnp.mean(next_token_log_probs(logits, clean)[:, start:])


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


def composition_scores(run, clean: np.ndarray, corrupted: np.ndarray, start: int) -> np.ndarray:
    """Returns [layer-0 head, 3]: through which of layer 1's queries, keys and values each layer-0 head acts.

    Path noising: entry [h, i] is the share of the clean-to-corrupted drop in the second copy's log-probability
    when layer 1's q, k or v (i = 0, 1, 2) alone is computed from a residual in which layer-0 head h's output comes
    from the corrupted run (everything else in layer 1, and all of layer 0, stays clean). A previous-token head that
    feeds the induction head's key match (K-composition) scores near 1 in the k column."""
    n_heads = run[0].cfg.n_heads
    metric = second_copy_log_prob(clean, start)
    base = float(metric(interp.run_with_hooks(run, clean, {})))
    drop = float(metric(interp.run_with_hooks(run, corrupted, {}))) - base
    _, cache = interp.run_with_cache(run, corrupted, ["blocks.0.attn.hook_z"])
    corrupted_z = cache["blocks.0.attn.hook_z"]
    names = [f"blocks.1.attn.hook_{x}" for x in "qkv"]
    scores = np.zeros((n_heads, 3))
    for head in range(n_heads):
        noise = {"blocks.0.attn.hook_z": lambda z, head=head: z.at[:, :, head].set(corrupted_z[:, :, head])}
        _, noised = interp.run_with_cache(run, clean, names, hooks=noise)
        for i, name in enumerate(names):
            logits = interp.run_with_hooks(run, clean, {name: lambda x, name=name: noised[name]})
            scores[head, i] = (float(metric(logits)) - base) / drop
    return scores


def find_heads(scores: dict[str, np.ndarray], share: float = 0.5) -> dict:
    """Returns the heads that attention alone picks, and whether ablation and noising rank them first.

    Previous-token heads: layer-0 heads whose previous score is at least `share` of the layer's best; induction
    heads: layer-1 heads whose induction score is at least `share` of the best (a model may grow two alike). A
    measure agrees when its top head in layer 0 is a previous-token head and its top head in layer 1 an induction
    head. The best-scoring ones are also given alone, as previous_token_head and induction_head."""
    picked = {name: [[layer, int(h)] for h in np.flatnonzero(scores[name][layer] >= share * scores[name][layer].max())]
              for layer, name in enumerate(("previous", "induction"))}
    agree = {measure: all(int(np.argmax(scores[measure][layer])) in [h for _, h in picked[name]]
                          for layer, name in enumerate(("previous", "induction")))
             for measure in ("ablation", "noising")}
    return {"previous_token_head": [0, int(np.argmax(scores["previous"][0]))],
            "induction_head": [1, int(np.argmax(scores["induction"][1]))],
            "previous_token_heads": picked["previous"], "induction_heads": picked["induction"], "agree": agree}


def copy_losses(run, clean: np.ndarray, start: int) -> dict[str, float]:
    """Returns the mean loss (nats) on the second copy's predictable tokens and on the random prefix."""
    model, variables = model_and_variables(run)
    nll = -np.asarray(next_token_log_probs(model.apply(variables, jnp.asarray(clean)), clean))
    half = clean.shape[1] - start
    return {"second_copy": float(nll[:, start:].mean()), "prefix": float(nll[:, :start - half - 1].mean())}


def table(scores: dict[str, np.ndarray], heads: dict) -> list[str]:
    """Returns the findings' Markdown table: a row per head, a column per measure, the two found heads marked."""
    lines = ["| head | previous | induction | main offset | ablation (nats) | noising (share) |",
             "|---|---|---|---|---|---|"]
    n_layers, n_heads = scores["previous"].shape
    for layer in range(n_layers):
        for head in range(n_heads):
            mark = (" (previous-token)" if [layer, head] in heads["previous_token_heads"] else
                    " (induction)" if [layer, head] in heads["induction_heads"] else "")
            cells = [f"{scores[m][layer, head]:.3f}" for m in ("previous", "induction")]
            cells += [str(int(scores["offset"][layer, head]))]
            cells += [f"{scores[m][layer, head]:.3f}" for m in ("ablation", "noising")]
            lines.append(f"| {layer}.{head}{mark} | " + " | ".join(cells) + " |")
    return lines


def head_names(picked: list[list[int]]) -> str:
    """Returns "0.1, 1.0" for [[0, 1], [1, 0]]."""
    return ", ".join(f"{layer}.{head}" for layer, head in picked)


def write_outputs(out: Path, run, scores, composition, heads, losses, clean, start, summary) -> None:
    (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(run[1]))
    patterns = views.attention_patterns(run, clean[:1])[:, 0]
    labels = [str(t) for t in clean[0]]
    chosen = [tuple(heads["previous_token_head"]), tuple(heads["induction_head"])]
    views.plot_attention(patterns, labels, out / "attention.png", heads=chosen,
                         title="previous-token head and induction head, one analysis row")
    for measure in ("ablation", "noising"):
        interp.plot_patching(scores[measure], out / f"{measure}.png", title=measure, xlabel="head")
    (out / "findings.json").write_text(json.dumps({
        **summary, **heads, "losses": losses, "composition": np.round(composition, 6).tolist(),
        "scores": {k: np.round(v, 6).tolist() for k, v in scores.items()}}, indent=1))
    agree = ", ".join(f"{m}: {'yes' if ok else 'no'}" for m, ok in heads["agree"].items())
    (out / "findings.md").write_text("\n".join([
        "# Induction heads", "",
        f"{summary['steps']} steps, seed {summary['seed']}, {summary['train_seconds']:.0f} s of training. "
        f"Loss on the second copy {losses['second_copy']:.3f} nats, on the random prefix {losses['prefix']:.3f} "
        f"(ln vocab = {np.log(summary['vocab_size']):.3f}).", "",
        f"By attention: previous-token heads {head_names(heads['previous_token_heads'])}, induction heads "
        f"{head_names(heads['induction_heads'])}. One of them ranked first in its layer by {agree}.", "",
        *table(scores, heads), "",
        "Through which of layer 1's inputs each layer-0 head acts (share of the drop when only that input sees the "
        "head's corrupted output):", "",
        "| layer-0 head | via queries | via keys | via values |", "|---|---|---|---|",
        *[f"| 0.{head} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for head, row in enumerate(composition)],
        ""]))


def run_experiment(argv: list[str]) -> dict:
    """Trains, measures every head and writes OUT; returns the findings."""
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="experiments/induction_heads.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/induction_heads")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--half", type=int, default=12, help="analysis rows: length of the repeated segment")
    parser.add_argument("--keep", type=float, default=RowSettings.keep,
                        help="training rows: chance that the next token is the current token's successor")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    cfg = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    settings = RowSettings(keep=args.keep)
    checks = [
        (2 <= args.half <= cfg.model.max_len // 2,
         f"--half={args.half} must be in [2, model.max_len // 2 = {cfg.model.max_len // 2}]"),
        (0 < args.keep <= 1, f"--keep={args.keep} must be in (0, 1]"),
        (cfg.model.ffn == "none" and cfg.model.n_layers == 2,
         f"model.ffn={cfg.model.ffn!r}, model.n_layers={cfg.model.n_layers}: this experiment needs an "
         "attention-only decoder (model.ffn='none') with 2 layers"),
        (cfg.model.vocab_size >= max(2 * args.half, settings.symbols_max),
         f"model.vocab_size={cfg.model.vocab_size} must be >= 2 * --half = {2 * args.half} and >= "
         f"{settings.symbols_max} symbols per training row"),
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
    composition = composition_scores(run, clean, corrupted, start)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"steps": cfg.train.steps, "seed": cfg.train.seed, "vocab_size": cfg.model.vocab_size,
               "train_seconds": seconds, "settings": dataclasses.asdict(settings)}
    write_outputs(out, run, scores, composition, heads, losses, clean, start, summary)
    if not args.quiet:
        print((out / "findings.md").read_text())
    return {**heads, "scores": scores, "composition": composition, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    return run_reporting_errors(run_experiment, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
