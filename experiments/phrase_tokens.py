"""Word tokens vs phrase tokens under the same decoder budget: bits per word, words/s, samples, readable tokens.

    python experiments/phrase_tokens.py --workdir runs/phrase_tokens [--config.train.steps=1000 ...]

Both arms use the config in experiments/configs/phrase_tokens.py (model, steps, batch and context length in
tokens identical); the word arm sets tokenizer.kind="topword". Each arm fits its tokenizer on the same training
documents with the same top-word settings, so both see exactly the same simplified words (the phrase tokenizer's
base is the word arm's tokenizer) and differ only in phrase merging. The arms are one toyjax.sweep (resumable:
finished arms are skipped) into WORKDIR/word,seed=S and WORKDIR/phrase,seed=S (S: the config's train.seed), next
to the sweep's WORKDIR/results.csv and results.md.

Bits per word = (summed validation NLL in nats) / (words in the scored targets) / ln 2, with words counted as
top-word tokens (punctuation included, <eos> excluded) by toyjax.tokenizers.phrases.count_words. The NLL is
summed over the whole validation split, tiled into consecutive windows of model.max_len tokens (so a phrase window
holds more words of context: that is part of what phrases buy). Writes WORKDIR/summary.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from toyjax.cli import run_reporting_errors
from toyjax import config as config_lib
from toyjax import load_run, sweep, train
from toyjax.data import pipeline
from toyjax.tokenizers.phrases import bits_per_word, count_words

CONFIG = ROOT / "experiments" / "configs" / "phrase_tokens.py"


def arm_points(config) -> dict[str, dict]:
    """Returns the sweep point of each arm: the word arm drops the phrases, the phrase arm is the config's."""
    return {"word": {"tokenizer.kind": "topword", "tokenizer.phrase_vocab_size": 0},
            "phrase": {"tokenizer.kind": "phrase", "tokenizer.phrase_vocab_size": config.tokenizer.phrase_vocab_size}}


def validation_nll(run, stream: pipeline.TokenStream, batch_size: int = 32) -> tuple[float, int, int]:
    """Returns (summed NLL in nats, scored tokens, scored words) over consecutive max_len windows of the stream.

    Scored by train's own eval step (the loss train.run reports), on the whole split rather than train.run's
    evenly spaced sample of windows, so every validation word is counted exactly once.
    """
    length = run.config.model.max_len
    n_windows = (len(stream.tokens) - 1) // length
    index = (np.arange(n_windows) * length)[:, None] + np.arange(length + 1)[None, :]
    windows = stream.tokens[index]  # [n_windows, length + 1]
    batches = [{"inputs": w[:, :-1], "targets": w[:, 1:]}
               for w in (windows[i:i + batch_size] for i in range(0, n_windows, batch_size))]
    eval_step = jax.jit(train.make_eval_step(run.model, run.config))  # stories only: no grammar tables
    measures = train.evaluate(eval_step, run.params, batches)
    targets = windows[:, 1:].reshape(-1)
    return measures["nll_sum"], int(measures["tokens"]), count_words(run.tokenizer, targets)


def describe(name: str, workdir: Path, row: dict, train_docs: list[str], valid_docs: list[str]) -> dict:
    """Returns one trained arm's record: its sweep row plus bits per word, words per token and samples."""
    run = load_run(workdir)
    cfg = run.config
    train_stream, valid_stream = (pipeline.TokenStream.encode(run.tokenizer, d) for d in (train_docs, valid_docs))
    nll, tokens, words = validation_nll(run, valid_stream)
    words_per_token_train = count_words(run.tokenizer, train_stream.tokens) / len(train_stream.tokens)
    samples = (workdir / "samples.txt").read_text().strip().split("\n\n")
    return {
        "arm": name,
        "vocab_size": run.tokenizer.vocab_size,
        "params": int(sum(x.size for x in jax.tree.leaves(run.params))),
        "valid_loss_per_token": nll / tokens,
        "valid_tokens": tokens,
        "valid_words": words,
        "bits_per_token": nll / tokens / math.log(2),
        "bits_per_word": bits_per_word(nll, words),
        "trainer_valid_loss": row["loss"],
        "words_per_token": words / tokens,
        "train_tokens_per_s": row["tokens_per_s"],
        "train_words_per_s": row["tokens_per_s"] * words_per_token_train,
        "train_words_seen": cfg.train.steps * cfg.train.batch_size * cfg.model.max_len * words_per_token_train,
        "samples": samples,
        "sample_words": float(np.mean([len(run.tokenizer.pre_tokenize(s)) for s in samples])) if samples else 0.0,
    }


def main(argv: list[str]) -> None:
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/phrase_tokens")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    workdir = Path(args.workdir)
    phrase_cfg = config_lib.apply_overrides(config_lib.load_config_file(CONFIG), overrides)
    arms = arm_points(phrase_cfg)
    sweep_rows = sweep.run_sweep(phrase_cfg, list(arms.values()), workdir, seeds=[phrase_cfg.train.seed],
                                 labels=list(arms), quiet=args.quiet)
    docs = pipeline.load_documents(phrase_cfg.data)
    train_docs, valid_docs = pipeline.split_train_valid(docs, phrase_cfg.data.valid_fraction)
    phrase_tok = load_run(workdir / sweep_rows[1]["name"]).tokenizer

    stats = phrase_tok.stats(valid_docs, top=30)
    print(f"\nphrase tokens on the validation split: {stats['mean_words_per_token']:.3f} words/token, "
          f"{stats['tokens_per_sentence']:.2f} tokens vs {stats['words_per_sentence']:.2f} words per sentence, "
          f"{stats['words_in_phrases_share']:.1%} of words inside a phrase, "
          f"{stats['phrases_used_share']:.1%} of phrases used")
    print("most frequent phrases:", ", ".join(f"{p} ({n})" for p, n in stats["top_phrases"][:20]))
    print("a validation story as phrase tokens:\n  " + " ".join(phrase_tok.tokens(valid_docs[0])[:60]) + "\n")

    rows = [describe(name, workdir / row["name"], row, train_docs, valid_docs) for name, row in zip(arms, sweep_rows)]

    print(f"\n{'arm':8}{'vocab':>7}{'params':>9}{'words/tok':>11}{'loss/tok':>10}{'bits/word':>11}"
          f"{'words/s':>10}{'words seen':>12}")
    for r in rows:
        print(f"{r['arm']:8}{r['vocab_size']:>7}{r['params']:>9,}{r['words_per_token']:>11.3f}"
              f"{r['valid_loss_per_token']:>10.4f}{r['bits_per_word']:>11.4f}{r['train_words_per_s']:>10.0f}"
              f"{r['train_words_seen']:>12,.0f}")
    for r in rows:
        print(f"\n{r['arm']} samples ({r['sample_words']:.0f} words on average):")
        for s in r["samples"]:
            print("  > " + s)
    summary = {"config": phrase_cfg.to_dict(), "phrase_stats": stats, "arms": rows}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    word, phrase = rows
    print(f"\nphrase vs word: bits/word {phrase['bits_per_word']:.4f} vs {word['bits_per_word']:.4f} "
          f"({phrase['bits_per_word'] / word['bits_per_word'] - 1:+.1%}), training words/s "
          f"{phrase['train_words_per_s'] / word['train_words_per_s']:.2f}x; summary in {workdir / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main, sys.argv[1:]))
