"""Three models, one tokenization: trains a dense, a top-k attention and an MoE decoder, compares them, and writes
which latent-fact probe families separate them.

    python experiments/three_models.py --out runs/three_models \
        [--n-examples 200 --n-probes 100 --config.KEY=VALUE ...]

Arms (experiments/configs/three_models.py, overrides apply to all three; each arm differs in one part):
  dense   the config as is (model.attention = model.ffn = "dense")
  topk    model.attention = "topk" (model.attention_top_k keys per query)
  moe     model.ffn = "moe" with model.moe.*, each expert d_ff = d_ff / moe.top_k (the dense arm's active FFN size)
The first arm fits the tokenizer; it is copied into the other workdirs before they train, so all three see the
same tokens. Finished arms are reused (toyjax.train.run resumes an interrupted one and only re-evaluates a
finished one). Then toyjax.compare scores all three on the same held-out stories and probes.

Writes into OUT: dense/, topk/, moe/ (run workdirs), results.json (the comparison, plus "arms", "findings" and
"timing"), report.md and report.html (toyjax.compare's report), findings.md (generated from results.json):
  * per model: bits per word, and probe accuracy per family with n and its binomial standard error
    sqrt(p (1 - p) / n); the expressible share of each family;
  * per family and pair of models: the accuracy gap against two standard errors of the difference (the pooled
    two-proportion test, which stays defined at 0 % or 100 %); a family "separates" the models when some pair's
    gap exceeds it; three example probes per separating family with each model's answer;
  * the examples hard for one model and easy for both others (toyjax.compare's z-score rule, both pairs), and
    the examples hard for all.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from toyjax import compare, config as config_lib, load_run, probes as probes_lib, train
from toyjax.cli import run_reporting_errors
from toyjax.config import Config, ConfigError
from toyjax.models.decoder import Decoder, init_params

CONFIG = Path(__file__).resolve().parent / "configs" / "three_models.py"
ARMS = ("dense", "topk", "moe")
PER_ARM_KEYS = ("model.attention", "model.ffn")  # set by the script, one per arm
SEPARATION_SE = 2.0  # a family separates two models when their accuracy gap exceeds this many standard errors
EXAMPLES_PER_FAMILY = 3
HARD_EXAMPLES = 3  # per model, and for "hard for all"


# -- the arms -------------------------------------------------------------------------------------------------


def arm_config(base: Config, arm: str) -> Config:
    """Returns the config of one arm: the base with its attention or feed-forward kind switched."""
    cfg = config_lib.from_dict(base.to_dict())
    cfg.model.attention, cfg.model.ffn = "dense", "dense"
    if arm == "topk":
        cfg.model.attention = "topk"
    elif arm == "moe":
        moe = cfg.model.moe
        if not 1 <= moe.top_k <= moe.n_experts or cfg.model.d_ff % moe.top_k:
            raise ConfigError(f"moe arm: model.moe.top_k={moe.top_k} must be in [1, model.moe.n_experts="
                              f"{moe.n_experts}] and divide model.d_ff={cfg.model.d_ff}")
        cfg.model.ffn, cfg.model.d_ff = "moe", cfg.model.d_ff // moe.top_k
    return cfg


def arm_configs(base: Config) -> dict[str, Config]:
    """Returns each arm's config, after checking that each model can be built (no workdir is made before)."""
    configs = {arm: arm_config(base, arm) for arm in ARMS}
    for arm, cfg in configs.items():
        # The vocabulary size comes from the tokenizer later; any stand-in builds the same parts.
        model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 8)
        try:
            jax.eval_shape(lambda c=model_cfg: init_params(Decoder(c), cfg.train.seed))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{arm} arm: the model cannot be built from this config: {err}") from None
    return configs


def train_arms(configs: dict[str, Config], out: Path, *, quiet: bool) -> dict[str, dict]:
    """Trains (or reuses) each arm in OUT/ARM; returns per arm its workdir, valid metrics and seconds spent."""
    arms, shared_tokenizer = {}, None
    for arm, cfg in configs.items():
        workdir = out / arm
        if shared_tokenizer is not None and not (workdir / "tokenizer").exists():
            shutil.copytree(shared_tokenizer, workdir / "tokenizer")  # the same tokens for every arm
        print(f"== {arm}: {cfg.train.steps} steps, attention {cfg.model.attention}, ffn {cfg.model.ffn}, "
              f"d_ff {cfg.model.d_ff}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = train.run(cfg, workdir, quiet=quiet)
        arms[arm] = {"workdir": str(workdir), "valid_ppl": result["ppl"], "valid_loss": result["loss"],
                     "steps": int(result["step"]), "train_seconds": time.perf_counter() - started,
                     "tokens_per_s": result.get("tokens_per_s")}
        shared_tokenizer = shared_tokenizer or workdir / "tokenizer"
    return arms


def check_shared_tokenizer(runs: dict) -> None:
    """Raises ConfigError unless every run has the same vocabulary (reused workdirs could differ)."""
    first, *rest = runs
    for name in rest:
        if list(runs[name].tokenizer.vocab) != list(runs[first].tokenizer.vocab):
            raise ConfigError(f"runs {first!r} and {name!r} have different tokenizers; delete one of the workdirs "
                              f"so that it is retrained with the shared tokenizer")


# -- findings (pure functions of the comparison) ---------------------------------------------------------------


def binomial_se(accuracy: float | None, n: int) -> float | None:
    """Returns the binomial standard error sqrt(p (1 - p) / n) of an accuracy over n probes (None for n = 0)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else None


def gap_se(correct_a: int, n_a: int, correct_b: int, n_b: int) -> float:
    """Returns the pooled two-proportion standard error of the difference of two accuracies (n_a, n_b > 0)."""
    pooled = (correct_a + correct_b) / (n_a + n_b)
    return math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))


def family_stats(results: dict) -> dict[str, dict[str, dict]]:
    """Returns [family][model] {n, expressible, correct, accuracy, se, mean_margin_bits}, counted from the probes."""
    names = [r["name"] for r in results["runs"]]
    stats = {}
    for family in probes_lib.FAMILIES:
        rows = [p for p in results["probes"] if p["family"] == family]
        stats[family] = {}
        for name in names:
            scored = [p["results"][name] for p in rows if p["results"][name]["expressible"]]
            correct = sum(r["correct"] for r in scored)
            accuracy = correct / len(scored) if scored else None
            stats[family][name] = {
                "n": len(rows), "expressible": len(scored), "correct": correct, "accuracy": accuracy,
                "se": binomial_se(accuracy, len(scored)),
                "mean_margin_bits": sum(r["margin_bits"] for r in scored) / len(scored) if scored else None}
    return stats


def separations(stats: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Returns per family {separates, pairs: [{better, worse, gap, se, ratio, separates}]}, largest ratio first.

    A pair where either model can express none of the family's probes is left out.
    """
    out = {}
    for family, by_model in stats.items():
        pairs = []
        for a, b in itertools.combinations(by_model, 2):
            sa, sb = by_model[a], by_model[b]
            if not sa["expressible"] or not sb["expressible"]:
                continue
            better, worse = (a, b) if sa["accuracy"] >= sb["accuracy"] else (b, a)
            gap = abs(sa["accuracy"] - sb["accuracy"])
            se = gap_se(sa["correct"], sa["expressible"], sb["correct"], sb["expressible"])
            ratio = gap / se if se > 0 else 0.0  # se = 0 only when both are at 0 % or both at 100 %
            pairs.append({"better": better, "worse": worse, "gap": gap, "se": se, "ratio": ratio,
                          "separates": bool(ratio > SEPARATION_SE)})
        pairs.sort(key=lambda p: -p["ratio"])
        out[family] = {"separates": any(p["separates"] for p in pairs), "pairs": pairs}
    return out


def model_answer(probe: dict, name: str) -> str | None:
    """Returns the candidate a model scores highest on a probe (None where it cannot express the probe)."""
    result = probe["results"][name]
    if not result["expressible"]:
        return None
    candidates = [probe["answer"], *probe["wrong"]]
    return candidates[max(range(len(candidates)), key=lambda i: result["scores_bits"][i])]


def probe_examples(results: dict, family: str, better: str, worse: str, k: int = EXAMPLES_PER_FAMILY) -> list[dict]:
    """Returns up to k probes of a family that `better` gets right and `worse` wrong, largest margin gap first."""
    names = [r["name"] for r in results["runs"]]
    rows = [p for p in results["probes"] if p["family"] == family
            and p["results"][better]["correct"] and p["results"][worse]["correct"] is False]
    rows.sort(key=lambda p: p["results"][worse]["margin_bits"] - p["results"][better]["margin_bits"])
    return [{"story": p["story"], "prompt_tail": p["prompt_tail"], "answer": p["answer"],
             "answers": {n: model_answer(p, n) for n in names},
             "margin_bits": {n: p["results"][n]["margin_bits"] for n in names}} for p in rows[:k]]


def hard_for_one(results: dict, k: int = HARD_EXAMPLES) -> dict[str, list[dict]]:
    """Returns per model up to k examples hard for it and easy for every other model, largest smallest gap first.

    Hard for A and easy for B is toyjax.compare's rule, z_A - z_B >= pair_gap; here it must hold against both
    others. The words responsible are those A pays the most bits for over the cheapest other model.
    """
    names = [r["name"] for r in results["runs"]]
    threshold = results["hardness"]["pair_gap"]
    out = {}
    for name in names:
        others = [o for o in names if o != name]
        gaps = [(min(e["z"][name] - e["z"][o] for o in others), e) for e in results["examples"]]
        chosen = sorted((g for g in gaps if g[0] >= threshold), key=lambda g: -g[0])[:k]
        out[name] = [{"id": e["id"], "min_gap": gap, "words": compare.responsible_words(
            e["words"], np.asarray(e["word_bits"][name]) - np.max([e["word_bits"][o] for o in others], axis=0))}
            for gap, e in chosen]
    return out


def findings(results: dict) -> dict:
    """Returns the findings (family stats, separations, examples, hard-for-one) of a three-way comparison."""
    stats = family_stats(results)
    separated = separations(stats)
    examples = {}
    for family, sep in separated.items():
        if sep["separates"]:
            top = sep["pairs"][0]
            examples[family] = probe_examples(results, family, top["better"], top["worse"])
    return {"families": stats, "separations": separated, "probe_examples": examples,
            "hard_for_one": hard_for_one(results), "hard_for_all": results["hard_for_all"][:HARD_EXAMPLES]}


# -- findings.md -----------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _snippet(words: list[str], index: int, before: int = 10, after: int = 3) -> str:
    start = max(index - before, 0)
    text = " ".join(words[start:index]) + f" **{words[index]}** " + " ".join(words[index + 1:index + 1 + after])
    return ("... " if start else "") + text.strip()


def render_findings(results: dict) -> str:
    """Returns findings.md: every number printed here is read from results (see the module doc)."""
    runs, found, arms = results["runs"], results["findings"], results["arms"]
    names = [r["name"] for r in runs]
    timing = results["timing"]
    out = ["# Three models, one tokenization: what separates them", "",
           f"Held-out text: {results['text_source']}; {len(results['examples'])} examples. "
           f"Wall time {timing['total_seconds']:.0f} s (training {timing['train_seconds']:.0f} s, comparison "
           f"{timing['compare_seconds']:.0f} s; an arm already trained costs only its evaluation).", "",
           "## Models", ""]
    out += _table(["model", "attention", "ffn", "params", "steps", "valid ppl", "bits/word", "train s"],
                  [[r["name"], r["model"]["attention"], r["model"]["ffn"], f"{r['params']:,}", str(r["step"]),
                    f"{arms[r['name']]['valid_ppl']:.4f}", f"{r['bits_per_word']:.4f}",
                    f"{arms[r['name']]['train_seconds']:.0f}"] for r in runs])
    out += ["", "## Probe accuracy per family", "",
            "accuracy ± binomial standard error over the expressible probes (correct / expressible of n); "
            "chance is 1 / number of candidates.", ""]
    out += _table(["family"] + names + ["expressible share"],
                  [[family] + [f"{_number(s[n]['accuracy'])} ± {_number(s[n]['se'])} "
                               f"({s[n]['correct']}/{s[n]['expressible']} of {s[n]['n']})" for n in names]
                   + [", ".join(f"{n} {s[n]['expressible'] / max(s[n]['n'], 1):.0%}" for n in names)]
                   for family, s in found["families"].items()])
    out += ["", f"## Which families separate the models (gap > {SEPARATION_SE:g} standard errors)", "",
            "The standard error of a gap is the pooled two-proportion one; every model answers the same probes, "
            "so a paired test would be sharper still.", ""]
    for family, sep in found["separations"].items():
        verdict = "**separates**" if sep["separates"] else "does not separate"
        pairs = "; ".join(f"{p['better']} {'>' if p['gap'] else '='} {p['worse']} by {p['gap']:.4f} (se {p['se']:.4f}, "
                          f"{p['ratio']:.1f} se{', separates' if p['separates'] else ''})" for p in sep["pairs"])
        out.append(f"- **{family}** {verdict}: {pairs or 'no two models can express its probes'}")
    for family, rows in found["probe_examples"].items():
        top = found["separations"][family]["pairs"][0]
        out += ["", f"### {family}: right for {top['better']}, wrong for {top['worse']}", ""]
        for p in rows:
            answers = ", ".join(f"{n} → {p['answers'][n]} ({p['margin_bits'][n]:+.2f} bits)" for n in names)
            out.append(f"- story {p['story']}: \"...{p['prompt_tail']}\" → **{p['answer']}**; {answers}")
        if not rows:
            out.append("(no probe right for one and wrong for the other)")
    texts = {e["id"]: e for e in results["examples"]}
    out += ["", "## Hard for one model, easy for both others", "", f"Rule: {results['hardness']['definition']}.", ""]
    for name, rows in found["hard_for_one"].items():
        out += [f"### hard for {name}", ""]
        for row in rows:
            ex = texts[row["id"]]
            bpw = ", ".join(f"{n} {ex['bits_per_word'][n]:.4f}" for n in names)
            words = "; ".join(f"{_snippet(ex['words'], w['index'])} ({w['bits']:+.2f} bits)" for w in row["words"])
            out.append(f"- example {row['id']} (smallest z gap {row['min_gap']:.2f}; bits/word {bpw}): {words}")
        out += ["(none)"] if not rows else []
        out.append("")
    out += ["## Hard for all", ""]
    for row in found["hard_for_all"]:
        ex = texts[row["id"]]
        words = "; ".join(f"{_snippet(ex['words'], w['index'])} ({w['bits']:.2f} bits)" for w in row["words"])
        out.append(f"- example {row['id']} (min z {row['min_z']:.2f}): {words}")
    out += ["(none)"] if not found["hard_for_all"] else []
    return "\n".join(out) + "\n"


# -- the script ------------------------------------------------------------------------------------------------


def run_experiment(argv: list[str]) -> Path:
    """Trains or reuses the three arms, compares them and writes OUT; returns the path of findings.md."""
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="experiments/three_models.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/three_models", help="output folder (one workdir per arm)")
    parser.add_argument("--config", default=str(CONFIG), help="the base (dense) config file")
    parser.add_argument("--n-examples", type=int, default=200, help="held-out texts to score (default 200)")
    parser.add_argument("--n-probes", type=int, default=100, help="probes per family (default 100)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.n_examples < 1 or args.n_probes < 1:
        raise ConfigError(f"--n-examples and --n-probes must be >= 1, got {args.n_examples} and {args.n_probes}")
    fixed = [o for o in overrides if o.split("=")[0].removeprefix("--config.") in PER_ARM_KEYS]
    if fixed:
        raise ConfigError(f"{fixed[0]}: {' and '.join(PER_ARM_KEYS)} are set per arm by this script; "
                          f"change the arms' parts through model.attention_top_k and model.moe.*")
    base = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    configs = arm_configs(base)
    out = Path(args.out)
    started = time.perf_counter()
    arms = train_arms(configs, out, quiet=args.quiet)
    trained = time.perf_counter()

    runs = {arm: load_run(info["workdir"]) for arm, info in arms.items()}
    check_shared_tokenizer(runs)
    texts, stories, source = compare.held_out(list(runs.values()), args.n_examples, args.n_probes)
    probe_list = probes_lib.make_probes(stories, args.n_probes)
    results = compare.compare_runs(runs, texts, probe_list, workdirs={a: i["workdir"] for a, i in arms.items()},
                                   quiet=args.quiet)
    results["text_source"] = source
    results["arms"] = arms
    results["findings"] = findings(results)
    finished = time.perf_counter()
    results["timing"] = {"train_seconds": trained - started, "compare_seconds": finished - trained,
                         "total_seconds": finished - started}
    compare.write_reports(results, out)
    path = out / "findings.md"
    path.write_text(render_findings(results))
    separating = [f for f, s in results["findings"]["separations"].items() if s["separates"]] or ["none"]
    line = ", ".join(f"{r['name']} {r['bits_per_word']:.3f}" for r in results["runs"])
    print(f"three_models: bits/word {line}; families that separate the models: {', '.join(separating)}; "
          f"{finished - started:.0f} s; findings in {path}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    return run_reporting_errors(run_experiment, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
