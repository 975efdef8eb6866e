"""What a run reports: the end-of-training summary (samples, loss plot) and `launch.py inspect`'s description."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from toyjax.config import Config
from toyjax.data.run_data import run_grammar
from toyjax.metrics import read_metrics
from toyjax.runs import load_run, log
from toyjax.sample import cut_at_eos, sample


def write_samples(cfg: Config, model, params, tokenizer, grammar, *, n: int, seed: int = 0) -> list[str]:
    if n <= 0:
        return []
    length = min(cfg.train.sample_length + 1, cfg.model.max_len)
    # Constrain only a model trained on the valid subset: a plain model's samples show what it learned alone.
    tokens = sample(model, params, [tokenizer.eos_id], n=n, length=length, key=jax.random.key(seed),
                    temperature=cfg.train.sample_temperature, grammar=grammar,
                    constrain=cfg.train.loss == "valid_subset")
    return [tokenizer.decode(row) for row in cut_at_eos(tokens, tokenizer.eos_id, skip=1)]


def plot_losses(workdir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "valid"):
        points = sorted((r["step"], r["loss"]) for r in records if r.get("split") == split)
        if points:
            ax.plot(*zip(*points), marker="o" if split == "valid" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(workdir.name)
    ax.legend()
    fig.tight_layout()
    path = workdir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finish(cfg, workdir: Path, model, params, tokenizer, grammar, result: dict, *, quiet: bool) -> None:
    samples = write_samples(cfg, model, params, tokenizer, grammar, n=cfg.train.n_samples, seed=cfg.train.seed)
    (workdir / "samples.txt").write_text("\n\n".join(samples) + "\n")
    plot_losses(workdir)
    log(f"valid loss {result['loss']:.4f}  perplexity {result['ppl']:.3f}  accuracy {result['accuracy']:.3f}  "
        f"({result['tokens_per_s']:.0f} train tokens/s)", quiet)
    for text in samples:
        log(f"  > {text}", quiet)


def parameter_table(params) -> list[str]:
    """Returns one line per parameter (path, shape, count, L2 norm) and a total."""
    lines, total = [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        value = np.asarray(leaf)
        total += value.size
        lines.append(f"  {name:<48} {str(value.shape):<18} {value.size:>10,}  norm {np.linalg.norm(value):.3f}")
    lines.append(f"  {'total':<48} {'':<18} {total:>10,}")
    return lines


def describe_run(workdir: str | Path, *, n_samples: int = 3, step: int | None = None) -> str:
    """Returns the text `launch.py inspect` prints."""
    run = load_run(workdir, step)
    cfg = run.config
    out = [f"run {workdir} at step {run.step}", "", "config:"]
    for section, values in cfg.to_dict().items():
        flat = ", ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, dict))
        out.append(f"  {section}: {flat}")
        out += [f"  {section}.{k}: " + ", ".join(f"{a}={b}" for a, b in v.items())
                for k, v in values.items() if isinstance(v, dict)]
    out += ["", f"tokenizer: {run.tokenizer!r}"]
    stats = getattr(run.tokenizer, "fit_stats", None) or getattr(run.tokenizer, "stats", None)
    if isinstance(stats, dict):
        out.append("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    out += ["", "parameters:"] + parameter_table(run.params)
    metrics = read_metrics(workdir)
    for split in ("train", "valid"):
        last = [r for r in metrics if r.get("split") == split]
        if last:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in last[-1].items() if k != "split"}
            out.append(f"last {split} metrics: {shown}")
    if n_samples:
        out += ["", "samples:"]
        grammar = run_grammar(cfg, run.tokenizer)
        out += [f"  > {text}" for text in write_samples(cfg, run.model, run.params, run.tokenizer, grammar, n=n_samples)]
    return "\n".join(out)
