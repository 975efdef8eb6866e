"""Fuzzer to mechanism: activation patching on each minimal (clean, corrupted) break the fuzzer found.

    python experiments/explain_breaks.py runs/fuzz_three_models/breaks.json --runs-from runs/three_models \
        --out runs/explain_breaks [--max-breaks N --top-k 3]
    (or --runs RUN [RUN ...]: the run folders given to the fuzzer, named as it named them)

For each break and each model whose pick it flipped: the clean and corrupted prompts are tokenized as the
fuzzer scores them (<eos> + prompt, the window that scores the answer); a pair whose token counts differ is
skipped with that reason (positions would not pair). The metric is logit(clean pick) - logit(corrupted pick) at
the last position (first tokens; equal to the probe's own score margin when both are one token, see
toyjax.interp.explain). Patched, clean into corrupted: the residual stream (resid_pre) and the attention and MLP
outputs by layer x position, and each head's output (z) by layer x head. Writes OUT/explanations.json (every
recovered fraction, the summaries, skip reasons), OUT/report.md (per break a table and heatmaps, then per model
which layers and heads most often carry its breaks) and the heatmaps OUT/break*_*.png.
Expect: not run yet on the three models; see docs/experiments/explain_breaks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from toyjax.cli import run_reporting_errors
from toyjax.config import ConfigError
from toyjax.interp import explain, plot_patching
from toyjax.report_html import markdown_table

SMALL_GAP = 0.1  # nats: a clean - corrupted logit difference below this makes recovered fractions noisy
BREAK_KEYS = ("oracle", "family", "story", "models", "clean", "corrupted", "edits")


def read_breaks(path: Path) -> list[dict]:
    """Returns the break records of a fuzzer breaks.json; anything else is a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give the breaks.json written by python launch.py fuzz ... --out DIR")
    try:
        breaks = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not JSON ({err}); give the breaks.json written by launch.py fuzz") from None
    if not isinstance(breaks, list) or not all(isinstance(b, dict) for b in breaks):
        raise ConfigError(f"{path} is not a fuzzer breaks.json (a list of break records); "
                          "give OUT/breaks.json of launch.py fuzz, not summary.json")
    for i, record in enumerate(breaks):
        missing = [k for k in BREAK_KEYS if k not in record]
        if missing or record.get("status") != "broken":
            raise ConfigError(f"{path}: record {i} is not a fuzzer break (missing {', '.join(missing) or 'status broken'}); "
                              "give OUT/breaks.json of launch.py fuzz")
    return breaks


def run_paths(models: list[str], runs: list[str] | None, runs_from: str | None) -> dict[str, Path]:
    """Returns the folder of each model named in the breaks: from --runs (named as fuzz names them) or --runs-from."""
    from toyjax.compare import run_names

    if runs:
        given = dict(zip(run_names(runs), map(Path, runs)))
    elif runs_from:
        given = {m: Path(runs_from) / m for m in models}
    else:
        raise ConfigError("name the fuzzed runs: --runs RUN [RUN ...] (as given to launch.py fuzz) or --runs-from DIR "
                          f"(holding {', '.join(f'DIR/{m}' for m in models)})")
    missing = [m for m in models if m not in given]
    if missing:
        raise ConfigError(f"breaks.json names model {missing[0]!r} but --runs gives {', '.join(given) or 'none'}; "
                          "pass the same run folders as to launch.py fuzz")
    for model in models:
        if not (given[model] / "config.json").is_file():
            raise ConfigError(f"run {model!r}: {given[model]} is not a toyjax run (no config.json)")
    return {m: given[m] for m in models}


def explain_break(index: int, record: dict, name: str, run, patchers: dict, top_k: int) -> dict:
    """Returns one (break, model) explanation: the patched recovered fractions and their summaries, or a skip reason."""
    entry = {"break": index, "model": name, **{k: record[k] for k in ("oracle", "family", "story", "clean", "corrupted")},
             "edits": [f"{e['old']} -> {e['new']}" for e in record["edits"]], "status": "skipped"}
    chosen = explain.picks(record, name)
    pair = explain.align_pair(run.tokenizer, record["clean"], record["corrupted"], run.config.model.max_len)
    metric = (explain.pair_metric(run.tokenizer, record["clean"], record["corrupted"], *chosen)
              if isinstance(chosen, tuple) else chosen)
    for reason in (chosen, pair, metric):
        if isinstance(reason, str):
            return {**entry, "reason": reason}
    results = {part: patch(run.params, pair.clean, pair.corrupted, metric.answer_id, metric.wrong_id)
               for part, patch in patchers.items()}
    clean_value, corrupted_value = float(results["resid_pre"].clean), float(results["resid_pre"].corrupted)
    if abs(clean_value - corrupted_value) < 1e-6:
        return {**entry, "reason": "the logit difference is the same on both prompts: nothing to recover"}
    patching = {}
    for part, result in results.items():
        summary = (explain.summarize_heads(result, top_k) if part == "heads"
                   else explain.summarize_positions(result, pair.labels, pair.edited, top_k))
        patching[part] = {"recovered": np.asarray(result.recovered, np.float64).tolist(), "summary": summary}
    return {**entry, "status": "explained", "answer": metric.answer, "wrong": metric.wrong,
            "answer_id": metric.answer_id, "wrong_id": metric.wrong_id,
            "metric_equals_probe_margin": metric.equals_probe_margin, "clean_metric": clean_value,
            "corrupted_metric": corrupted_value, "window_start": pair.window_start, "tokens": list(pair.labels),
            "corrupted_tokens": list(pair.corrupted_labels), "edited_positions": list(pair.edited), "patching": patching}


def _number(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cells(summary: dict, part: str) -> str:
    if part == "heads":
        return ", ".join(f"L{c['layer']}H{c['head']} {c['recovered']:.2f}" for c in summary["top_heads"])
    return ", ".join(f"L{c['layer']}@{c['position']} {c['token']!r}{'*' if c['edited'] else ''} {c['recovered']:.2f}"
                     for c in summary["top_cells"])


def plot_entry(entry: dict, out: Path) -> list[Path]:
    """Writes the heatmaps of one explanation (positions before the first edit are cropped: 0 by causality)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", entry["model"])
    first = min(entry["edited_positions"])
    paths = []
    for part, found in entry["patching"].items():
        values = np.asarray(found["recovered"])
        path = out / f"break{entry['break']:03d}_{slug}_{part}.png"
        if part == "heads":
            paths.append(plot_patching(values, path, xlabel="head", title=f"{entry['model']}: heads (z), recovered"))
        else:
            paths.append(plot_patching(values[:, first:], path, xticklabels=entry["tokens"][first:],
                                       xlabel=f"position (from {first}, the first edit)",
                                       title=f"{entry['model']}: {part}, recovered"))
    return paths


def render_markdown(entries: list[dict], summary: dict, figures: dict) -> str:
    out = ["# Fuzzer breaks explained by activation patching", "",
           f"{summary['explained']} of {len(entries)} (break, model) pairs explained; metric: logit(clean pick) - "
           "logit(corrupted pick) at the last prompt position; recovered = (patched - corrupted) / "
           "(clean - corrupted); `*` marks an edited position.", ""]
    for e in entries:
        out += [f"## Break {e['break']} ({e['oracle']}, {e['family']}, story {e['story']}): {e['model']}", "",
                f"Edits: {', '.join(e['edits'])}. Corrupted prompt ends: ...{e['corrupted'][-80:]}", ""]
        if e["status"] != "explained":
            out += [f"Skipped: {e['reason']}.", ""]
            continue
        out += [f"Picks {e['answer']!r} clean, {e['wrong']!r} corrupted; logit difference {e['clean_metric']:.3f} -> "
                f"{e['corrupted_metric']:.3f} ({'equals' if e['metric_equals_probe_margin'] else 'approximates'} the "
                "probe's score margin)."
                + (f" The gap is under {SMALL_GAP} nats, so recovered fractions are noisy." if
                   abs(e["clean_metric"] - e["corrupted_metric"]) < SMALL_GAP else ""), ""]
        rows = [[part, ", ".join(f"L{x['layer']} {x['recovered']:.2f}" for x in p["summary"]["top_layers"]),
                 "" if part == "heads" else ", ".join(f"{x['position']} {x['token']!r}{'*' if x['edited'] else ''} "
                                                     f"{x['recovered']:.2f}" for x in p["summary"]["top_positions"]),
                 _cells(p["summary"], part),
                 "" if part == "heads" else f"{p['summary']['edited_best']:.2f} / {_number(p['summary']['elsewhere_best'])}"]
                for part, p in e["patching"].items()]
        out += [markdown_table(["patched", "top layers", "top positions", "top cells", "edited best / elsewhere best"],
                               rows), ""]
        out += [f"![{p.stem}]({p.name})" for p in figures[e["break"], e["model"]]] + [""]
    out += ["# Across breaks, per model", ""]
    for model, found in summary["aggregate"].items():
        out += [f"## {model} ({found['explained']} breaks explained)", ""]
        for part in ("heads", "attn_out", "mlp_out"):
            if part in found:
                rows = [[f"L{r['layer']}" + (f"H{r['head']}" if "head" in r else ""), r["times_in_top"],
                         r["mean_recovered"]] for r in found[part][:8]]
                out += [f"{part}:", "", markdown_table(["where", "times in a break's top k", "mean recovered"], rows), ""]
    return "\n".join(out)


def main(argv: list[str]) -> None:
    from tqdm import tqdm

    from toyjax.runs import load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("breaks", help="OUT/breaks.json of launch.py fuzz")
    parser.add_argument("--runs", nargs="+", default=None, help="the run folders given to the fuzzer")
    parser.add_argument("--runs-from", default=None, help="a folder holding one run per model name (DIR/NAME)")
    parser.add_argument("--out", required=True, help="folder for explanations.json, report.md and heatmaps")
    parser.add_argument("--max-breaks", type=int, default=None, help="explain only the first N breaks")
    parser.add_argument("--top-k", type=int, default=3, help="layers, positions, heads listed per break")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.top_k < 1 or (args.max_breaks is not None and args.max_breaks < 0):
        raise ConfigError(f"--top-k must be >= 1 and --max-breaks >= 0, got {args.top_k} and {args.max_breaks}")
    breaks = read_breaks(Path(args.breaks))[:args.max_breaks]
    models = list(dict.fromkeys(m for b in breaks for m in b["models"]))
    runs = {m: load_run(p) for m, p in run_paths(models, args.runs, args.runs_from).items()}
    for name, run in runs.items():
        if run.config.model.grammar_state_embedding:
            raise ConfigError(f"run {name!r} is a grammar-state run; the fuzzer (and so this) works on story runs")
    patchers = {name: {part: explain.make_patcher(run.model, *explain.PATCHES[part]) for part in explain.PATCHES
                       if part != "mlp_out" or run.config.model.ffn != "none"} for name, run in runs.items()}
    entries = [explain_break(i, b, m, runs[m], patchers[m], args.top_k)
               for i, b in enumerate(tqdm(breaks, desc="explain breaks", disable=args.quiet)) for m in b["models"]]
    summary = {"explained": sum(e["status"] == "explained" for e in entries), "aggregate": explain.aggregate(entries, args.top_k)}
    out = Path(args.out)  # written only now, after every input was read and every break patched
    out.mkdir(parents=True, exist_ok=True)
    figures = {(e["break"], e["model"]): plot_entry(e, out) for e in entries if e["status"] == "explained"}
    (out / "explanations.json").write_text(json.dumps({"breaks": str(args.breaks), "top_k": args.top_k, **summary,
                                                       "explanations": entries}, indent=1))
    (out / "report.md").write_text(render_markdown(entries, summary, figures))
    print(f"explain_breaks: {summary['explained']} of {len(entries)} (break, model) pairs explained, "
          f"{len(entries) - summary['explained']} skipped; report in {out / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main, sys.argv[1:]))
