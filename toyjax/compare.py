"""Compare trained runs on the same words: bits per word, latent-fact probes, and what is hard for whom.

    python launch.py compare RUN_A RUN_B [RUN_C ...] [--text FILE] [--n-examples 200] [--n-probes 100] --out DIR

Text: --text FILE (documents split at blank lines), else held-out embedded stories: the runs' shared validation
split when they share a data config, else stories from a generator seed none of them trained on. Probes are
cut from held-out stories the same way (toyjax.probes).

"Hard" is relative to each model's own level, so a weaker model is not "hard" everywhere: per example, the
bits per word of model m are z-scored over the examples, z_m = (bpw_m - mean_m) / std_m.
  hard for A, easy for B:  z_A - z_B >= PAIR_GAP (one standard deviation), largest gap first;
  hard for all:            min over models of z_m >= ALL_Z, largest minimum first.
The words responsible are those with the largest bits_A - bits_B (pairs), or the largest minimum bits over
the models (hard for all), word for word on the shared original words.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from toyjax import evaluate, probes as probes_lib
from toyjax.config import ConfigError
from toyjax.data import pipeline, stories as stories_lib, text as text_lib
from toyjax.runs import Run, load_run

PAIR_GAP = 1.0
ALL_Z = 0.5
TOP_EXAMPLES = 10
TOP_WORDS = 3
HARDNESS = (f"per model, each example's bits/word is z-scored over the examples (z = (bpw - mean) / std); "
            f"'hard for A, easy for B' = z_A - z_B >= {PAIR_GAP}; 'hard for all' = min over models of z >= {ALL_Z}; "
            f"responsible words = largest bits_A - bits_B (pairs) or largest minimum bits over the models (all)")


def run_names(paths: Sequence[str | Path]) -> list[str]:
    """Returns a short unique name per run path (its folder name, with the parent's if names clash)."""
    paths = [Path(p).resolve() for p in paths]
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def held_out(runs: Sequence[Run], n_examples: int, n_stories: int) -> tuple[list[str], list, str]:
    """Returns (texts, stories for probes, where they come from): held-out data none of the runs trained on."""
    data = [r.config.data for r in runs]
    fresh = 1 + max(d.generator_seed for d in data)  # a generator seed no run trained on
    fresh_stories = lambda: stories_lib.generate_stories(max(n_stories, n_examples), fresh)  # noqa: E731
    if all(d == data[0] for d in data):
        cfg = data[0]
        _, valid = pipeline.split_train_valid(pipeline.load_documents(cfg), cfg.valid_fraction)
        if valid:
            stories = []
            if cfg.source == "stories":
                valid_set = set(valid)
                stories = [s for s in stories_lib.generate_stories(cfg.n_stories, cfg.generator_seed)
                           if s.text in valid_set]
            source = f"the runs' shared validation split (data.source={cfg.source!r}, {len(valid)} documents)"
            return valid[:n_examples], (stories or fresh_stories())[:n_stories], source
    stories = fresh_stories()
    return [s.text for s in stories[:n_examples]], stories[:n_stories], f"embedded stories from generator seed {fresh}"


def zscores(values: np.ndarray) -> np.ndarray:
    """Returns values z-scored along the last axis (0 where a row is constant)."""
    std = values.std(axis=-1, keepdims=True)
    return np.where(std > 0, (values - values.mean(axis=-1, keepdims=True)) / np.where(std > 0, std, 1), 0.0)


def responsible_words(words: list[str], cost: np.ndarray, top: int = TOP_WORDS) -> list[dict]:
    """Returns the `top` words with the largest positive cost, as {index, word, cost}."""
    order = [int(i) for i in np.argsort(-cost, kind="stable")[:top] if cost[i] > 0]
    return [{"index": i, "word": words[i], "bits": float(cost[i])} for i in order]


def contrasts(names: list[str], bpw: np.ndarray, word_bits: list[list[np.ndarray]], words: list[list[str]],
              top: int = TOP_EXAMPLES) -> tuple[list[dict], list[dict]]:
    """Returns (pairs, hard_for_all) from bpw [models, examples] and word_bits[model][example] (see module doc)."""
    z = zscores(bpw)
    pairs = []
    for a, hard in enumerate(names):
        for b, easy in enumerate(names):
            if a == b:
                continue
            gap = z[a] - z[b]
            order = [int(e) for e in np.argsort(-gap, kind="stable") if gap[e] >= PAIR_GAP][:top]
            pairs.append({"hard_for": hard, "easy_for": easy, "examples": [
                {"id": e, "gap": float(gap[e]), "z_hard": float(z[a, e]), "z_easy": float(z[b, e]),
                 "words": responsible_words(words[e], word_bits[a][e] - word_bits[b][e])} for e in order]})
    floor = z.min(axis=0)
    order = [int(e) for e in np.argsort(-floor, kind="stable") if floor[e] >= ALL_Z][:top]
    hard_for_all = [{"id": e, "min_z": float(floor[e]),
                     "words": responsible_words(words[e], np.min([word_bits[m][e] for m in range(len(names))], 0))}
                    for e in order]
    return pairs, hard_for_all


def _run_summary(name: str, workdir: str, run: Run, scored, seconds_per_example: float) -> dict:
    cfg = run.config
    statuses = [s for st in scored for s in st.word_status]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.params))
    return {"name": name, "workdir": str(workdir), "step": int(run.step), "tokenizer": run.tokenizer.kind,
            "vocab_size": run.tokenizer.vocab_size, "params": n_params,
            "model": {k: getattr(cfg.model, k) for k in ("attention", "ffn", "d_model", "n_layers", "max_len")},
            "bits_per_word": evaluate.bits_per_word(scored), "words": len(statuses),
            "eos_bits_mean": float(np.mean([s.eos_bits for s in scored])),
            "simplified_share": statuses.count("simplified") / max(len(statuses), 1),
            "unk_share": statuses.count("unk") / max(len(statuses), 1),
            "examples_per_s": 1.0 / max(seconds_per_example, 1e-9)}


def compare_runs(runs: dict[str, Run], texts: Sequence[str], probe_list: Sequence[probes_lib.Probe], *,
                 workdirs: dict[str, str] | None = None, quiet: bool = False) -> dict:
    """Returns the comparison (the content of results.json) of named runs on texts and probes."""
    names = list(runs)
    if len(names) < 2:
        raise ConfigError(f"compare needs at least two runs, got {len(names)}")
    if not texts:
        raise ConfigError("compare: no texts to score")
    scored, summaries, probe_results = {}, [], {}
    for name, run in runs.items():
        started = time.perf_counter()
        scored[name] = evaluate.score_texts(run, texts, name=name, quiet=quiet)
        seconds = (time.perf_counter() - started) / len(texts)
        probe_results[name] = probes_lib.score_probes(run, probe_list)
        summary = _run_summary(name, (workdirs or {}).get(name, ""), run, scored[name], seconds)
        summary["probes"] = probes_lib.summarize(probe_list, probe_results[name])
        summaries.append(summary)
    words = [s.words for s in scored[names[0]]]
    for name in names[1:]:
        if [len(s.words) for s in scored[name]] != [len(w) for w in words]:
            raise ConfigError(f"runs {names[0]!r} and {name!r} split the text into different words; "
                              f"their bits per word cannot be compared word for word")
    bpw = np.array([[s.bits_per_word for s in scored[n]] for n in names])  # [models, examples]
    word_bits = [[s.word_bits for s in scored[n]] for n in names]
    pairs, hard_for_all = contrasts(names, bpw, word_bits, words)
    z = zscores(bpw)
    examples = [{"id": e, "text": texts[e], "words": words[e],
                 "bits_per_word": {n: float(bpw[m, e]) for m, n in enumerate(names)},
                 "z": {n: float(z[m, e]) for m, n in enumerate(names)},
                 "word_bits": {n: [round(float(b), 4) for b in word_bits[m][e]] for m, n in enumerate(names)},
                 "word_status": {n: scored[n][e].word_status for n in names}} for e in range(len(texts))]
    probe_rows = [{"family": p.family, "story": p.story, "prompt_tail": p.prompt[-80:], "answer": p.answer,
                   "wrong": p.wrong, "results": {n: probe_results[n][i] for n in names}}
                  for i, p in enumerate(probe_list)]
    hardness = {"pair_gap": PAIR_GAP, "all_z": ALL_Z, "definition": HARDNESS}
    return {"runs": summaries, "hardness": hardness, "examples": examples, "pairs": pairs,
            "hard_for_all": hard_for_all, "probes": probe_rows}


def write_reports(results: dict, out: str | Path) -> None:
    """Writes results.json, report.md and report.html of a comparison into the folder out (made if missing)."""
    from toyjax import report_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report_html.render_markdown(results))
    (out / "report.html").write_text(report_html.render_html(results))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="launch.py compare")
    parser.add_argument("runs", nargs="+", help="two or more run workdirs")
    parser.add_argument("--out", required=True, help="folder for report.html, report.md and results.json")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (documents split at blank lines)")
    parser.add_argument("--n-examples", type=int, default=200, help="texts to score (default 200)")
    parser.add_argument("--n-probes", type=int, default=100, help="probes per family (default 100)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        raise ConfigError(f"compare needs at least two runs, got {len(args.runs)}: {args.runs[0]}")
    if args.n_examples < 1 or args.n_probes < 0:
        raise ConfigError(f"--n-examples must be >= 1 and --n-probes >= 0, got {args.n_examples}, {args.n_probes}")
    names = run_names(args.runs)
    runs = {name: load_run(path) for name, path in zip(names, args.runs)}  # a bad path fails before any output
    texts, stories, source = held_out(list(runs.values()), args.n_examples, args.n_probes)
    if args.text:
        texts = text_lib.read_corpus(args.text)[: args.n_examples]
        source = f"documents of {args.text}"
    probe_list = probes_lib.make_probes(stories, args.n_probes)
    results = compare_runs(runs, texts, probe_list, workdirs=dict(zip(names, args.runs)), quiet=args.quiet)
    results["text_source"] = source
    out = Path(args.out)
    write_reports(results, out)
    line = "; ".join(f"{r['name']} {r['bits_per_word']:.3f} bits/word" for r in results["runs"])
    print(f"compare: {line}; report in {out / 'report.html'}", file=sys.stderr)
