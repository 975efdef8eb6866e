"""Parameter sweeps: every point of a grid trained into its own sub-workdir, resumably, then tabled and plotted.

    python launch.py sweep --config FILE --workdir DIR --grid model.d_model=64,128 tokenizer.vocab_size=500,2000
                           [--zip] [--seeds 0,1,2] [--metric ppl] [--config.KEY=VALUE ...]

    DIR/sweep.json                 the sweep definition (base config, points, seeds); a different one is an error
    DIR/d_model=64,vocab_size=500,seed=0/   one toyjax.train workdir per point and seed, plus
        sweep_result.json          written when the point has finished: its row of the results table
    DIR/results.csv                one row per point and seed
    DIR/results.md                 mean ± sample standard deviation over seeds, per point
    DIR/<metric>_vs_<key>.png      the metric against each swept key (other keys as separate lines)

From Python: `rows = run_sweep(base_config, [{"model.d_model": 64}, {"model.d_model": 128}], "runs/x", seeds=[0, 1])`.
A point is a dict of dotted config keys to values; points may set different keys (e.g. a dense arm without
model.attention_top_k) and several keys at once. `labels=["small", "big"]` names each point's sub-workdirs
('DIR/small,seed=0') in place of its key=value list, for points that set many keys (an experiment's arms). A point whose sub-workdir holds sweep_result.json is skipped; one with checkpoints but
no result resumes from them (toyjax.train.run does that).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from toyjax import config as config_lib
from toyjax import train
from toyjax.checkpoints import Checkpoints
from toyjax.config import Config, ConfigError
from toyjax.config_rules import get_key
from toyjax.models.decoder import Decoder, init_params
from toyjax.runs import differences

RESULT_FILE = "sweep_result.json"
DEFINITION_FILE = "sweep.json"
METRICS = ("loss", "ppl", "accuracy", "tokens_per_s", "params", "wall_s")
_NAME_LIMIT = 150  # characters; most filesystems allow 255 bytes per name


# -- the grid ---------------------------------------------------------------------------------------------------


def parse_value(base: Config, key: str, text: Any) -> Any:
    """Returns a value for `key` parsed (or checked) with the type of its config field; bad keys/values raise."""
    if key == "train.seed":
        raise ConfigError("train.seed cannot be a grid key; give the seeds with --seeds 0,1,2")
    scratch = config_lib.from_dict(base.to_dict())
    config_lib.set_key(scratch, key, text)
    return get_key(scratch, key)


def parse_grid(items: list[str], base: Config) -> dict[str, list]:
    """Returns {dotted key: [typed values]} from strings like 'model.d_model=64,128', validated against base."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.removeprefix("--").removeprefix("config.").partition("=")
        texts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(texts):
            raise ConfigError(f"grid item {item!r} must look like model.d_model=64,128 "
                              "(a key, '=', comma-separated values)")
        if key in grid:
            raise ConfigError(f"grid key '{key}' is given twice; list all its values in one item")
        parsed = [parse_value(base, key, text) for text in texts]
        repeated = sorted({str(v) for v in parsed if parsed.count(v) > 1})
        if repeated:
            raise ConfigError(f"grid key '{key}' repeats the value(s) {', '.join(repeated)}")
        grid[key] = parsed
    return grid


def expand_points(grid: dict[str, list], *, paired: bool = False) -> list[dict]:
    """Returns the points of a grid: the cross product of its values, or (paired) the i-th value of every key."""
    keys = list(grid)
    if not paired:
        return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]
    lengths = {key: len(values) for key, values in grid.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError("--zip pairs the i-th values of every key, so every key needs the same number of values; got "
                          + ", ".join(f"{key}: {n}" for key, n in lengths.items()))
    return [dict(zip(keys, values)) for values in zip(*grid.values())]


def parse_seeds(text: str) -> list[int]:
    """Returns the seeds of '0,1,2' (distinct integers)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct comma-separated integers, e.g. 0,1,2; got {text!r}")
    return seeds


def short_key_names(keys: list[str]) -> dict[str, str]:
    """Returns each key's shortest dotted suffix that no other key ends with ('model.d_model' -> 'd_model')."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            suffix = ".".join(parts[-depth:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        names[key] = suffix
    return names


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def check_labels(labels: list[str], points: list[dict]) -> None:
    """Raises ConfigError unless there is one distinct, non-empty, filesystem-safe label per point."""
    if len(labels) != len(points):
        raise ConfigError(f"a sweep needs one label per point; got {len(labels)} labels for {len(points)} points")
    for label in labels:
        if not isinstance(label, str) or not label or label in (".", "..") or _safe(label) != label:
            raise ConfigError(f"sweep label {label!r} cannot name a folder; use letters, digits and . _ + -")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"sweep labels must be distinct; repeated: {', '.join(repeated)}")


def point_names(points: list[dict], seeds: list[int], labels: list[str] | None = None) -> list[str]:
    """Returns one filesystem-safe, unique name per (point, seed), points outer: 'd_model=64,vocab_size=500,seed=0'.

    labels (checked by check_labels): a point's label replaces its key=value list ('dense,seed=0').
    """
    if labels is not None:
        check_labels(labels, points)
        return [f"{label},seed={seed}" for label, seed in itertools.product(labels, seeds)]
    short = short_key_names(list(dict.fromkeys(k for point in points for k in point)))
    names, identities = [], []
    for point, seed in itertools.product(points, seeds):
        name = ",".join([*(f"{_safe(short[k])}={_safe(str(v))}" for k, v in point.items()), f"seed={seed}"])
        identity = json.dumps([sorted(point.items()), seed], default=str)
        if len(name) > _NAME_LIMIT:
            name = name[:_NAME_LIMIT - 9] + "-" + hashlib.sha1(identity.encode()).hexdigest()[:8]
        names.append(name)
        identities.append(identity)
    # Two values can become one name once unsafe characters are replaced ('a/b', 'a_b'): tell them apart by a hash.
    return [f"{name}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}" if names.count(name) > 1 else name
            for name, identity in zip(names, identities)]


def point_config(base: Config, point: dict, seed: int) -> Config:
    """Returns a validated copy of base with the point's keys and train.seed set (a bad combination is a ConfigError)."""
    config = config_lib.from_dict(base.to_dict())
    for key, value in point.items():
        if key == "train.seed":
            raise ConfigError("train.seed cannot be a grid key; give the seeds separately")
        config_lib.set_key(config, key, value)
    config.train.seed = seed
    return config_lib.validate(config)


# -- the sweep definition ---------------------------------------------------------------------------------------


def _check_definition(workdir: Path, definition: dict) -> None:
    """Raises ConfigError if workdir holds a different sweep (or something that is not a sweep)."""
    path = workdir / DEFINITION_FILE
    if not path.is_file():
        if workdir.is_dir() and any(workdir.iterdir()):
            raise ConfigError(f"{workdir} is not empty and holds no {DEFINITION_FILE}; give the sweep a new --workdir")
        return
    saved = json.loads(path.read_text())
    # The metric only picks what is plotted: changing it is allowed.
    problems = differences({k: saved.get(k) for k in definition if k != "metric"},
                           {k: v for k, v in definition.items() if k != "metric"})
    if problems:
        raise ConfigError(f"{workdir} holds a different sweep; use another --workdir or the same definition:\n  "
                          + "\n  ".join(problems))


# -- running ----------------------------------------------------------------------------------------------------


def parameter_count(run_dir: Path) -> int:
    """Returns the number of parameters of the model a run's config.json describes (shapes only, nothing restored)."""
    config = config_lib.load(run_dir / "config.json")
    shapes = jax.eval_shape(lambda: init_params(Decoder(config.model), config.train.seed))
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def _write_json_atomically(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2))
    partial.replace(path)  # a reader sees the whole file or none


def run_sweep(base: Config, points: list[dict], workdir: str | Path, *, seeds: list[int] = (0,), metric: str = "ppl",
              quiet: bool = True, echo: Callable[[str], None] = print, labels: list[str] | None = None) -> list[dict]:
    """Returns the results table (one dict per point and seed, points outer) after training, or skipping, every point.

    Each row's "name" is its sub-workdir under workdir. labels: one name per point for its sub-workdirs (see
    point_names); None names them from the swept keys. Everything is validated before the first folder is made.
    Writes results.csv after every point and results.md and the plots at the end (see the module docstring).
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct integers, got {seeds}")
    points = [{key: get_key(point_config(base, point, 0), key) for key in point} for point in points]  # typed values
    keys = list(dict.fromkeys(k for point in points for k in point))
    names = point_names(points, seeds, labels)
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ConfigError(f"the sweep lists the same point twice: {', '.join(twice)}")
    jobs = [(point, seed, point_config(base, point, seed), name)
            for (point, seed), name in zip(itertools.product(points, seeds), names)]
    workdir = Path(workdir)
    definition = json.loads(json.dumps({"base_config": base.to_dict(), "points": points, "seeds": seeds,
                                        "labels": None if labels is None else list(labels), "metric": metric}))
    _check_definition(workdir, definition)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(workdir / DEFINITION_FILE, definition)

    rows = []
    for index, (point, seed, config, name) in enumerate(jobs, 1):
        run_dir = workdir / name
        if (run_dir / RESULT_FILE).is_file():
            row, status = json.loads((run_dir / RESULT_FILE).read_text()), "skipped"
        else:
            checkpoints = run_dir / "checkpoints"
            start_step = (Checkpoints(checkpoints, read_only=True).latest_step() if checkpoints.is_dir() else None) or 0
            started = time.perf_counter()
            result = train.run(config, run_dir, quiet=quiet)
            row = {"name": name, **point, "seed": seed, "loss": result["loss"], "ppl": result["ppl"],
                   "accuracy": result["accuracy"], "tokens_per_s": result["tokens_per_s"],
                   "params": parameter_count(run_dir), "wall_s": time.perf_counter() - started,
                   "start_step": start_step, "steps": result["step"]}
            _write_json_atomically(run_dir / RESULT_FILE, row)
            status = "resumed" if start_step else "ran"
        rows.append(row)
        write_csv(workdir / "results.csv", rows, keys)
        echo(f"[{index}/{len(jobs)}] {name}: {status}, {metric} {row[metric]:.4g}")
    table = aggregate(rows, keys, METRICS)
    (workdir / "results.md").write_text(markdown_table(table, keys, seeds, metric))
    for key in keys:
        plot_metric(table, keys, key, metric, workdir / f"{metric}_vs_{_safe(key)}.png")
    return rows


# -- results ----------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    columns = ["name", *keys, "seed", *METRICS, "start_step", "steps"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def aggregate(rows: list[dict], keys: list[str], columns: tuple[str, ...] = METRICS) -> list[dict]:
    """Returns one entry per point (in order of first appearance): its values, n, and per column mean and std.

    std is the sample standard deviation over seeds (n - 1 in the denominator); NaN when n = 1.
    A key a point does not set has the value None.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    table = []
    for values, members in groups.items():
        entry = {"point": dict(zip(keys, values)), "n": len(members), "mean": {}, "std": {}}
        for column in columns:
            samples = np.array([float(m[column]) for m in members], np.float64)
            entry["mean"][column] = float(samples.mean())
            entry["std"][column] = float(samples.std(ddof=1)) if len(samples) > 1 else float("nan")
        table.append(entry)
    return table


def format_spread(mean: float, std: float) -> str:
    """Returns 'mean ± std': 4 significant digits, whole numbers from 1000 up; 'mean' alone when std is NaN."""
    number = lambda x, digits: f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"  # noqa: E731
    return number(mean, 4) if math.isnan(std) else f"{number(mean, 4)} ± {number(std, 2)}"


def markdown_table(table: list[dict], keys: list[str], seeds: list[int], metric: str) -> str:
    """Returns results.md: one row per point, mean ± sample std over seeds of every metric."""
    header = [*keys, "n", *METRICS]
    lines = [f"# Sweep results ({metric} is the plotted metric)", "",
             f"{len(table)} points x seeds {', '.join(map(str, seeds))}. Each cell: mean ± sample standard deviation "
             "over seeds (n of them); loss, ppl and accuracy on the validation batches at the final step.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = ["" if entry["point"][k] is None else str(entry["point"][k]) for k in keys] + [str(entry["n"])]
        cells += [format_spread(entry["mean"][c], entry["std"][c]) for c in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_metric(table: list[dict], keys: list[str], key: str, metric: str, path: Path) -> None:
    """Draws the metric's mean ± std over seeds against one key; each setting of the other keys is a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in table if e["point"][key] is not None]
    others = [k for k in keys if k != key]
    lines: dict[tuple, list[dict]] = {}
    for entry in entries:
        lines.setdefault(tuple((k, entry["point"][k]) for k in others), []).append(entry)
    if all(len(line) == 1 for line in lines.values()):  # paired (--zip) keys: the other keys move with this one
        lines = {(): entries}
    values = list(dict.fromkeys(e["point"][key] for e in entries))
    numeric = all(_is_number(v) for v in values)
    position = (lambda v: v) if numeric else {v: i for i, v in enumerate(values)}.get
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, line in lines.items():
        line = sorted(line, key=lambda e: position(e["point"][key]))
        ax.errorbar([position(e["point"][key]) for e in line], [e["mean"][metric] for e in line],
                    yerr=[0.0 if math.isnan(e["std"][metric]) else e["std"][metric] for e in line],
                    marker="o", capsize=3, label=", ".join(f"{k}={v}" for k, v in label if v is not None) or None)
    if numeric and min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_xscale("log")
    if numeric:
        ax.set_xticks(values, [str(v) for v in values])
    else:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    n = sorted({e["n"] for e in entries})
    ax.set(xlabel=key, ylabel=f"{metric} (mean ± std over {'/'.join(map(str, n))} seeds)", title=f"{metric} vs {key}")
    if any(label for label in lines):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
