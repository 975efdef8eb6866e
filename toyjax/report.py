"""Human-readable summaries of a run: config, step, parameter tree, last metrics, samples."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from toyjax.runs import load_run, read_metrics, run_grammar, write_samples


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
