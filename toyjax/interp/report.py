"""The interp command: one trained run and one text -> where it attends and routes, what it predicts layer by layer,
which heads write the prediction, and (with a corrupted text) which activations carry the difference.

    python launch.py interp RUN --text "..." [--corrupted "..." --answer WORD --wrong WORD] --out DIR

The text is encoded as the sampler does (<eos>, then the text) and must fit model.max_len. Writes to DIR:
  report.html        one self-contained page: attention per layer/head (buttons; hover a token to see where it
                     attends), expert routing per token (MoE), logit lens, direct logit attribution, patching
  attention.png      attention per layer and head (top-k attention: the kept keys)   routing.png (MoE)
  logit_lens.png     log-prob of the final prediction read off the residual stream before each layer
  dla.png            each head's (and embedding's, MLP's) direct contribution to the final position's logit of the
                     answer (minus the wrong answer's with --corrupted)
  patching_resid_pre.png, patching_z.png (--corrupted): recovered fraction of the logit difference when one clean
                     residual position (layer × position) or one clean head output (layer × head) is patched into
                     the corrupted run; answer / wrong default to the clean / corrupted runs' top predictions
  report.md, results.json
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path

import jax
import numpy as np

from toyjax.config import ConfigError
from toyjax.interp import attribution, patching, views
from toyjax.interp.hooked import run_with_cache
from toyjax.report_html import html_page, html_table, markdown_table

TOP_TOKENS = 5
TOP_COMPONENTS = 10


def encode_text(run, text: str, what: str = "--text") -> np.ndarray:
    """Returns [1, n] token ids of <eos> + text; empty, unknown-word or over-long text is a ConfigError."""
    tokenizer = run.tokenizer
    ids = [tokenizer.eos_id] + list(tokenizer.encode(text))
    if len(ids) < 2:
        raise ConfigError(f"{what} {text!r} encodes to no tokens; give some words")
    unknown = [w for w, simple in zip(tokenizer.pre_tokenize(text), tokenizer.words(text)) if simple == "<unk>"]
    if unknown:
        raise ConfigError(f"{what}: the tokenizer cannot encode {', '.join(map(repr, unknown))} (they become <unk>); "
                          "use words of the run's vocabulary")
    if len(ids) > run.config.model.max_len:
        raise ConfigError(f"{what} is {len(ids)} tokens (with the leading <eos>), more than the run's "
                          f"model.max_len={run.config.model.max_len}; shorten it")
    return np.asarray([ids], np.int32)


def token_labels(tokenizer, ids) -> list[str]:
    """Returns a readable string per token id (<eos> for the document separator)."""
    lower = getattr(tokenizer, "lowercase", False)  # decode capitalises a lone word as a sentence start
    return ["<eos>" if i == tokenizer.eos_id else (str.lower if lower else str)(tokenizer.decode([int(i)]))
            for i in ids]


def word_id(tokenizer, word: str, option: str) -> int:
    """Returns the one token id of `word`; a word of several tokens or none is a ConfigError naming the option."""
    ids = tokenizer.encode(word)
    if len(ids) != 1 or ids[0] == tokenizer.unk_id:
        raise ConfigError(f"{option} {word!r} must be one known token of the run's vocabulary, got {len(ids)} "
                          f"token(s){' (<unk>)' if tokenizer.unk_id in ids else ''}")
    return int(ids[0])


def _top(log_probs, labels_of, k: int = TOP_TOKENS) -> str:
    order = np.argsort(-log_probs)[:k]
    return ", ".join(f"{labels_of([i])[0]} {np.exp(log_probs[i]):.2f}" for i in order)


def analyse(run, tokens, *, target: int | None = None, baseline: int | None = None) -> dict:
    """Returns the views, logit lens and direct logit attribution of one text at its last position.

    target: the token whose logit is attributed (default: the run's top prediction); baseline: a token whose
    logit is subtracted (the attribution is then of the logit difference).
    """
    cfg = run.config.model
    names = (views.view_names(run, tokens) + attribution.logit_lens_names(run)
             + attribution.attribution_names(run, "head"))
    logits, cache = run_with_cache(run, tokens, list(dict.fromkeys(names)))
    log_probs = np.asarray(jax.nn.log_softmax(logits[0, -1]), np.float64)
    target = int(np.argmax(log_probs)) if target is None else target
    lens = np.asarray(jax.nn.log_softmax(attribution.logit_lens(run, cache)[:, 0, -1]), np.float64)  # [layer+1, vocab]
    ids = [target] + ([] if baseline is None else [baseline])
    dla = attribution.direct_logit_attribution(run, cache, by="head", token_ids=ids)
    values = np.asarray(dla.values[:, 0, -1], np.float64)  # [component, len(ids)]
    contribution = values[:, 0] - (values[:, 1] if baseline is not None else 0.0)
    return {"patterns": views.patterns_from_cache(cache, cfg.n_layers)[:, 0],
            "routing": [(e[0], g[0]) for e, g in views.routing_from_cache(cache, cfg.n_layers) or []] or None,
            "log_probs": log_probs, "target": target, "baseline": baseline, "lens": lens,
            "dla_labels": dla.labels, "dla": contribution}


def plot_logit_lens(lens, token_ids: dict[str, int], path) -> Path:
    """Writes the log-prob of each named token read off the residual stream before each layer (and after the
    last) at the final position, and returns the path."""
    plt = views.pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for name, token in token_ids.items():
        ax.plot(range(len(lens)), lens[:, token], marker="o", label=name)
    ax.set_xticks(range(len(lens)), [f"L{i}" for i in range(len(lens) - 1)] + ["out"])
    ax.set_xlabel("residual stream before layer")
    ax.set_ylabel("log-prob at the last position")
    ax.legend(fontsize=7)
    return views.save_figure(fig, path)


def plot_dla(labels: list[str], values, path, *, title: str) -> Path:
    """Writes a horizontal bar per residual component (its direct contribution) and returns the path."""
    plt = views.pyplot()
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.22 * len(labels)))
    ax.barh(range(len(labels)), values, color=["#c44" if v > 0 else "#46c" for v in values])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.5)
    ax.set_title(title, fontsize=9)
    return views.save_figure(fig, path)


def run_patching(run, clean, corrupted, answer: int, wrong: int) -> dict:
    """Returns the logit difference answer - wrong of both runs and the recovered fraction per layer × position
    (resid_pre) and per layer × head (z)."""
    metric = patching.logit_difference(answer, wrong)
    resid = patching.patch_activation(run, clean, corrupted, metric, "hook_resid_pre", index="position")
    heads = patching.patch_activation(run, clean, corrupted, metric, "attn.hook_z", index="head")
    return {"clean": float(resid.clean), "corrupted": float(resid.corrupted),
            "resid_pre": np.asarray(resid.recovered, np.float64), "z": np.asarray(heads.recovered, np.float64)}


def _image(path: Path) -> str:
    return (f'<p><img alt="{path.name}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
            "</p>")


def _ranked(labels, values, k: int) -> list[list]:
    order = np.argsort(-np.abs(values))[:k]
    return [[labels[i], float(values[i])] for i in order]


def write_report(run, out: Path, text: str, corrupted_text: str | None = None, *, answer: str | None = None,
                 wrong: str | None = None) -> dict:
    """Writes the pictures, report.html, report.md and results.json of one text (see the module doc) to out and
    returns the results; every input is checked before anything is written."""
    tokenizer = run.tokenizer
    if run.config.model.grammar_state_embedding:
        raise ConfigError("interp does not handle grammar-state runs (model.grammar_state_embedding) yet")
    clean = encode_text(run, text)
    corrupted = None if corrupted_text is None else encode_text(run, corrupted_text, "--corrupted")
    if corrupted is not None and corrupted.shape != clean.shape:
        raise ConfigError(f"--text is {clean.shape[1]} tokens and --corrupted {corrupted.shape[1]}; patching pairs "
                          "positions, so they must be the same length (swap words for words)")
    answer_id = None if answer is None else word_id(tokenizer, answer, "--answer")
    wrong_id = None if wrong is None else word_id(tokenizer, wrong, "--wrong")
    labels_of = lambda ids: token_labels(tokenizer, ids)  # noqa: E731
    labels = labels_of(clean[0])
    results: dict = {"text": text, "tokens": labels}
    if corrupted is not None:
        answer_id = answer_id if answer_id is not None else analyse(run, clean)["target"]
        wrong_id = wrong_id if wrong_id is not None else analyse(run, corrupted)["target"]
        if answer_id == wrong_id:
            raise ConfigError(f"the clean and corrupted texts both lead to {labels_of([answer_id])[0]!r}: the logit "
                              "difference would be 0; name the two words with --answer and --wrong")
    found = analyse(run, clean, target=answer_id, baseline=wrong_id if corrupted is not None else None)
    target_name = labels_of([found["target"]])[0]
    out.mkdir(parents=True, exist_ok=True)
    pictures = [views.plot_attention(found["patterns"], labels, out / "attention.png", title="attention")]
    if found["routing"] is not None:
        pictures.append(views.plot_routing(found["routing"], labels, run.config.model.moe.n_experts,
                                           out / "routing.png", title="expert gates"))
    lens_tokens = {f"{target_name} (answer)": found["target"]}
    if found["baseline"] is not None:
        lens_tokens[f"{labels_of([found['baseline']])[0]} (wrong)"] = found["baseline"]
    pictures.append(plot_logit_lens(found["lens"], lens_tokens, out / "logit_lens.png"))
    what = f"logit of {target_name!r}" + (f" - {labels_of([found['baseline']])[0]!r}" if found["baseline"] is not None
                                          else "")
    pictures.append(plot_dla(found["dla_labels"], found["dla"], out / "dla.png", title=f"direct {what}"))
    lens_rows = [[("out" if i == len(found["lens"]) - 1 else f"before layer {i}"),
                  float(found["lens"][i, found["target"]]), _top(found["lens"][i], labels_of)]
                 for i in range(len(found["lens"]))]
    dla_rows = _ranked(found["dla_labels"], found["dla"], TOP_COMPONENTS)
    results.update(prediction=_top(found["log_probs"], labels_of), target=target_name,
                   logit_lens=lens_rows, direct_logit_attribution=dla_rows)
    sections = [("Logit lens (last position)", ["residual", f"log-prob {target_name}", "top tokens"], lens_rows),
                (f"Direct {what} (top {TOP_COMPONENTS} components)", ["component", "contribution"], dla_rows)]
    if corrupted is not None:
        patched = run_patching(run, clean, corrupted, found["target"], found["baseline"])
        pictures.append(patching.plot_patching(patched["resid_pre"], out / "patching_resid_pre.png", xticklabels=labels,
                                               title=f"recovered fraction of {what}: resid_pre"))
        pictures.append(patching.plot_patching(patched["z"], out / "patching_z.png", xlabel="head",
                                               title=f"recovered fraction of {what}: head outputs (z)"))
        n_heads = patched["z"].shape[1]
        flat = [f"blocks.{i // n_heads}.attn.head{i % n_heads}" for i in range(patched["z"].size)]
        head_rows = _ranked(flat, patched["z"].reshape(-1), TOP_COMPONENTS)
        results.update(corrupted=corrupted_text, corrupted_tokens=labels_of(corrupted[0]),
                       logit_difference={"clean": patched["clean"], "corrupted": patched["corrupted"]},
                       patching_resid_pre=patched["resid_pre"].tolist(), patching_z=patched["z"].tolist(),
                       top_patched_heads=head_rows)
        sections.append((f"Patching: {what} is {patched['clean']:.3f} clean, {patched['corrupted']:.3f} corrupted; "
                         "heads by recovered fraction", ["head", "recovered"], head_rows))
    title = f"interp: {text[:60]}"
    intro = [f"<h1>{html.escape(title)}</h1>", f"<p>Prediction after the text: {html.escape(results['prediction'])}"
             f"</p>"]
    views_part = views.views_html(labels, found["patterns"], found["routing"], kind=run.config.model.attention)
    tables = [part for i, (head, header, rows) in enumerate(sections)
              for part in (f"<h2>{html.escape(head)}</h2>", html_table(f"table-{i}", header, rows))]
    (out / "report.html").write_text(html_page(title, intro + views_part + tables + [_image(p) for p in pictures]))
    markdown = [f"# {title}", "", f"Prediction: {results['prediction']}", ""]
    for head, header, rows in sections:
        markdown += [f"## {head}", "", markdown_table(header, rows), ""]
    markdown += [f"![{p.stem}]({p.name})" for p in pictures]
    (out / "report.md").write_text("\n".join(markdown) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str]) -> None:
    from toyjax.runs import load_run

    parser = argparse.ArgumentParser(prog="launch.py interp")
    parser.add_argument("run", help="a trained run's workdir")
    parser.add_argument("--text", required=True, help="the (clean) text to look into")
    parser.add_argument("--corrupted", default=None, help="a text of the same length in tokens: adds patching")
    parser.add_argument("--answer", default=None, help="the right next word (default: the clean top prediction)")
    parser.add_argument("--wrong", default=None, help="the wrong next word (default: the corrupted top prediction)")
    parser.add_argument("--out", required=True, help="folder for report.html, report.md, results.json, pictures")
    args = parser.parse_args(argv)
    if (args.answer or args.wrong) and args.corrupted is None:
        raise ConfigError("--answer and --wrong name the logit difference of patching; they need --corrupted")
    results = write_report(load_run(args.run), Path(args.out), args.text, args.corrupted, answer=args.answer,
                           wrong=args.wrong)
    line = f"interp: predicts {results['prediction']}"
    if "top_patched_heads" in results:
        head, value = results["top_patched_heads"][0]
        line += f"; patching {head} recovers {value:.2f} of the logit difference"
    print(f"{line}; report in {Path(args.out) / 'report.html'}", file=sys.stderr)
