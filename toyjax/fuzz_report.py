"""The fuzz command and its report: TextAttack-style summary, where each model breaks, curves, minimal breaks.

    python launch.py fuzz RUN [RUN ...] --bert DIR --out DIR [--budget 100 --n-probes 10 --max-edits 3 --seed 0]

Writes OUT/breaks.json (every minimal breaking pair: clean and corrupted prompt, the edits, what flipped, per
model, and whether a from-scratch plain forward pass confirms it), OUT/summary.json, OUT/report.md,
OUT/report.html (one self-contained page, sortable tables, the curves inline) and the curves as
OUT/failure_vs_edits.png and OUT/failure_vs_plausibility.png. The masked LM is --bert or $TOYJAX_BERT, a
BERT folder with an MLM head.

Summary per (oracle, model): attacked = probes the oracle applies to (for answer oracles: the model answers
right on the clean probe); success rate = broken / attacked; mean edits over the breaks; mean queries over the
attacks (clean evaluation included); accuracy before = right on the clean probe / expressible probes, after =
right and not broken / expressible probes; confirmed = breaks a plain forward pass reproduces / breaks.
Failure rate at k edits = attacks broken with <= k edits / attacked; at plausibility p = attacks broken by a
set of relative MLM log-probability >= p / attacked.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from toyjax import fuzz, probes as probes_lib
from toyjax.config import ConfigError
from toyjax.report_html import html_page, html_table, markdown_table

BERT_HELP = ("python launch.py bert-adapt --config experiments/configs/bert_adapt.py --workdir runs/bert_adapt "
             "(~30 min CPU), then pass --bert runs/bert_adapt/hf or set TOYJAX_BERT=runs/bert_adapt/hf")
CURVES = ("failure_vs_edits.png", "failure_vs_plausibility.png")


def load_bert(path: str | None):
    """Returns the masked LM at path (or $TOYJAX_BERT); a missing folder or MLM head is a ConfigError."""
    from toyjax.fuzz import bert_lib

    path = path or os.environ.get("TOYJAX_BERT")
    if not path:
        raise ConfigError(f"fuzz needs a BERT folder with an MLM head (--bert DIR or $TOYJAX_BERT); make one: {BERT_HELP}")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"--bert {path}: no config.json there (not a BERT folder); make one: {BERT_HELP}")
    bert = bert_lib.load(path)
    if not bert.has_mlm_head:
        raise ConfigError(f"--bert {path} has no MLM head (cls.predictions.*), so it cannot propose edits; "
                          f"make one: {BERT_HELP}")
    return bert


def _group_key(attack: dict) -> str:
    return "+".join(attack["models"])


def summarize(attacks: list[dict]) -> list[dict]:
    """Returns one TextAttack-style row per (oracle, model or model set) (see the module doc)."""
    rows = []
    for oracle in dict.fromkeys(a["oracle"] for a in attacks):
        for model in dict.fromkeys(_group_key(a) for a in attacks if a["oracle"] == oracle):
            mine = [a for a in attacks if a["oracle"] == oracle and _group_key(a) == model]
            tried = [a for a in mine if a["status"] != "skipped"]
            broken = [a for a in tried if a["status"] == "broken"]
            answers = fuzz.ORACLES[oracle].measure == "answer" and not fuzz.ORACLES[oracle].joint
            rows.append({
                "oracle": oracle, "model": model, "probes": len(mine), "attacked": len(tried), "broken": len(broken),
                "success_rate": len(broken) / len(tried) if tried else None,
                "mean_edits": float(np.mean([a["n_edits"] for a in broken])) if broken else None,
                "mean_queries": float(np.mean([a["queries"] for a in tried])) if tried else None,
                "accuracy_before": len(tried) / len(mine) if answers and mine else None,
                "accuracy_after": (len(tried) - len(broken)) / len(mine) if answers and mine else None,
                "confirmed": float(np.mean([a["confirmed"] for a in broken])) if broken else None})
    return rows


def failure_curves(attacks: list[dict], max_edits: int) -> dict:
    """Returns {(oracle, model, family): {"edits": [rate at 1..K], "plausibility": (thresholds, rates)}}."""
    thresholds = np.linspace(-20, 5, 51)
    curves = {}
    for key in dict.fromkeys((a["oracle"], _group_key(a), a["family"]) for a in attacks):
        tried = [a for a in attacks if (a["oracle"], _group_key(a), a["family"]) == key and a["status"] != "skipped"]
        if not tried:
            continue
        broken = [a for a in tried if a["status"] == "broken"]
        curves[key] = {"attacked": len(tried),
                       "edits": [sum(a["n_edits"] <= k for a in broken) / len(tried) for k in range(1, max_edits + 1)],
                       "plausibility": (thresholds.tolist(),
                                        [sum(a["plausibility"] >= t for a in broken) / len(tried) for t in thresholds])}
    return curves


def where_it_breaks_first(attacks: list[dict], models: list[str]) -> dict:
    """Returns per model its fewest-edit, most plausible break (oracle, family, edits) or None."""
    out = {}
    for model in models:
        broken = [a for a in attacks if a["status"] == "broken" and model in a["models"]]
        best = min(broken, key=lambda a: (a["n_edits"], -a["plausibility"]), default=None)
        out[model] = None if best is None else {
            "oracle": best["oracle"], "family": best["family"], "n_edits": best["n_edits"],
            "plausibility": best["plausibility"], "edits": [f"{e['old']} -> {e['new']}" for e in best["edits"]]}
    return out


def plot_curves(curves: dict, out: Path, max_edits: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracles = list(dict.fromkeys(k[0] for k in curves)) or ["(no attacks)"]
    paths = []
    for name, kind in zip(CURVES, ("edits", "plausibility")):
        fig, axes = plt.subplots(1, len(oracles), figsize=(4.5 * len(oracles), 3.6), squeeze=False)
        for ax, oracle in zip(axes[0], oracles):
            for (o, model, family), curve in curves.items():
                if o != oracle:
                    continue
                xs, ys = (range(1, max_edits + 1), curve["edits"]) if kind == "edits" else curve["plausibility"]
                ax.plot(list(xs), ys, marker="o" if kind == "edits" else None, label=f"{model} / {family}")
            ax.set_title(oracle)
            ax.set_xlabel("edits" if kind == "edits" else "relative MLM log-prob of the edits >=")
            ax.set_ylabel("failure rate")
            ax.set_ylim(-0.02, 1.02)
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        paths.append(out / name)
    return paths


SUMMARY_HEADER = ["oracle", "model", "probes", "attacked", "broken", "success rate", "mean edits", "mean queries",
                  "accuracy before", "accuracy after", "confirmed"]
BREAK_HEADER = ["oracle", "family", "story", "model", "edits", "n edits", "plausibility", "flipped", "confirmed",
                "corrupted (end)"]


def _summary_rows(results: dict) -> list[list]:
    return [[r["oracle"], r["model"], r["probes"], r["attacked"], r["broken"], r["success_rate"], r["mean_edits"],
             r["mean_queries"], r["accuracy_before"], r["accuracy_after"], r["confirmed"]] for r in results["summary"]]


def _flipped(b: dict) -> str:
    if "before" in b:
        return f"{'/'.join(b['before'])} -> {'/'.join(b['after'])} (right: {b['expected']})"
    return f"{b['bits_before']:.2f} -> {b['bits_after']:.2f} bits/token"


def _break_rows(results: dict) -> list[list]:
    return [[b["oracle"], b["family"], b["story"], "+".join(b["models"]),
             ", ".join(f"{e['old']} -> {e['new']}" for e in b["edits"]), b["n_edits"], b["plausibility"],
             _flipped(b), "yes" if b["confirmed"] else "NO", b["corrupted"][-100:]] for b in results["breaks"]]


def _first_lines(results: dict) -> list[str]:
    return [f"{model}: " + ("no break found" if first is None else
                            f"{first['n_edits']} edit(s), {first['oracle']} on {first['family']} "
                            f"({', '.join(first['edits'])}; plausibility {first['plausibility']:.2f})")
            for model, first in results["first_break"].items()]


def render_markdown(results: dict) -> str:
    s = results["settings"]
    out = [f"# Fuzzing {', '.join(results['models'])}", "",
           f"{results['probes_expressible']} of {results['probes']} probes expressible by every model; budget "
           f"{s['budget']} queries per attack, up to {s['max_edits']} edits, beam {s['beam_width']}, "
           f"{s['candidates_per_slot']} candidates per slot; {results['queries']['total']} queries in "
           f"{results['seconds']:.0f} s.", "", "## Where each model breaks first", ""]
    out += [f"- {line}" for line in _first_lines(results)]
    out += ["", "## Summary", "", markdown_table(SUMMARY_HEADER, _summary_rows(results)), "",
            f"Curves: {', '.join(CURVES)}.", "", "## Minimal breaks", "",
            markdown_table(BREAK_HEADER, _break_rows(results)) if results["breaks"] else "(none)", ""]
    return "\n".join(out)


def render_html(results: dict, out: Path) -> str:
    import html

    images = "".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode((out / name).read_bytes()).decode()}">'
                     for name in CURVES)
    oracles = "".join(f"<li><b>{html.escape(o.name)}</b>: {html.escape(o.description)}</li>"
                      for o in fuzz.ORACLES.values() if o.name in results["settings"]["oracles"])
    parts = [f"<h1>Fuzzing {html.escape(', '.join(results['models']))}</h1>",
             f"<ul>{oracles}</ul>", "<h2>Where each model breaks first</h2><ul>",
             "".join(f"<li>{html.escape(line)}</li>" for line in _first_lines(results)), "</ul>",
             "<h2>Summary</h2>", html_table("summary", SUMMARY_HEADER, _summary_rows(results)),
             "<h2>Where the line is</h2>", images,
             "<h2>Minimal breaks</h2>", html_table("breaks", BREAK_HEADER, _break_rows(results))]
    return html_page("fuzz: " + ", ".join(results["models"]), parts)


def main(argv: list[str]) -> None:
    from toyjax import compare
    from toyjax.runs import load_run

    parser = argparse.ArgumentParser(prog="launch.py fuzz")
    parser.add_argument("runs", nargs="+", help="one or more run workdirs")
    parser.add_argument("--out", required=True, help="folder for report.html, report.md, breaks.json, curves")
    parser.add_argument("--bert", default=None, help="BERT folder with an MLM head (default: $TOYJAX_BERT)")
    parser.add_argument("--budget", type=int, default=100, help="queries per attack, clean evaluation included")
    parser.add_argument("--n-probes", type=int, default=10, help="probes per family (default 10)")
    parser.add_argument("--max-edits", type=int, default=3)
    parser.add_argument("--beam-width", type=int, default=3, help="1 = greedy")
    parser.add_argument("--candidates", type=int, default=3, help="MLM candidates kept per slot")
    parser.add_argument("--any-class", action="store_true", help="replacements need not keep the word's class")
    parser.add_argument("--oracles", default=",".join(fuzz.FuzzSettings.oracles), help="comma-separated")
    parser.add_argument("--surprisal-jump", type=float, default=1.0, help="bits/token (surprisal oracle)")
    parser.add_argument("--seed", type=int, default=0, help="shifts the held-out story generator seed")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.n_probes < 1:
        raise ConfigError(f"--n-probes must be >= 1, got {args.n_probes}")
    settings = fuzz.FuzzSettings(budget=args.budget, max_edits=args.max_edits, beam_width=args.beam_width,
                                 candidates_per_slot=args.candidates, keep_class=not args.any_class,
                                 surprisal_jump_bits=args.surprisal_jump,
                                 oracles=tuple(o.strip() for o in args.oracles.split(",") if o.strip()))
    bert = load_bert(args.bert)
    names = compare.run_names(args.runs)
    runs = {name: load_run(path) for name, path in zip(names, args.runs)}  # bad input fails before any output
    stories = fuzz.held_out_stories(list(runs.values()), 3 * args.n_probes, args.seed)
    probe_list = probes_lib.make_probes(stories, args.n_probes)
    started = time.perf_counter()
    results = fuzz.fuzz(runs, bert, stories, probe_list, settings, progress=not args.quiet)
    results["seconds"] = time.perf_counter() - started
    results["summary"] = summarize(results["attacks"])
    results["first_break"] = where_it_breaks_first(results["attacks"], names)
    results["breaks"] = [a for a in results["attacks"] if a["status"] == "broken"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(failure_curves(results["attacks"], settings.max_edits), out, settings.max_edits)
    (out / "breaks.json").write_text(json.dumps(results["breaks"], indent=1))
    (out / "summary.json").write_text(json.dumps({k: v for k, v in results.items() if k not in ("attacks", "breaks")},
                                                 indent=1))
    (out / "report.md").write_text(render_markdown(results))
    (out / "report.html").write_text(render_html(results, out))
    confirmed = np.mean([b["confirmed"] for b in results["breaks"]]) if results["breaks"] else float("nan")
    print(f"fuzz: {len(results['breaks'])} breaks ({confirmed:.0%} confirmed from scratch) in "
          f"{sum(a['status'] != 'skipped' for a in results['attacks'])} attacks; " + "; ".join(_first_lines(results))
          + f"; report in {out / 'report.html'}", file=sys.stderr)
