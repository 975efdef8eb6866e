"""Fuzzer candidate evaluations per second: batched (one BERT call, batched decoder calls) vs one at a time.

    python bench/fuzz.py [--probes 6 --candidates 3]

A candidate evaluation = one edit scored by the masked LM (its log-prob at the mask) and its edited probe
scored by the target decoder. Batched: toyjax.fuzz.score_edits (every masked position of every probe in one
packed BERT call) and Targets.observe (every edited probe's candidate texts scored by shared prefixes:
toyjax.fuzz_scoring, each distinct window prefix through the decoder once, with the KV cache). Naive: for each
edit, one BERT call for its (context, word) and one plain jitted decoder call (probes.score_probes with
evaluate.token_log_probs) for its edited probe's candidate texts (the first --naive-limit edits). Both run here
on the same edits, after a warm-up of each (compilation excluded), --repeats times interleaved, each side's
fastest repeat kept (the machine is shared: the minimum is the least disturbed); random weights at real sizes:
a MiniLM-shaped BERT (6 x 384) over the story words and a 4 x 128 decoder with max_len 128.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from toyjax import fuzz, fuzz_edits, probes as probes_lib
from toyjax.data import pipeline
from toyjax.models.decoder import Decoder, init_params
from toyjax.runs import Run
from toyjax.testing import tiny_config


def build(tmp: str):
    cfg = tiny_config(model={"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512, "max_len": 128},
                      tokenizer={"vocab_size": 400}, data={"n_stories": 1000})
    texts = pipeline.load_documents(cfg.data)
    tokenizer = pipeline.fit_tokenizer(cfg.tokenizer, texts)
    cfg.model.vocab_size = tokenizer.vocab_size
    model = Decoder(cfg.model)
    run = Run(cfg, init_params(model, cfg.train.seed), tokenizer, 0, model)
    words = sorted({w for t in texts[:500] for w in tokenizer.pre_tokenize(t)})
    config = fuzz.bert_lib.BertConfig(vocab_size=5 + len(words), max_position_embeddings=128)
    bert = fuzz.bert_lib.load(fuzz.bert_lib.write_random_folder(f"{tmp}/bert", words, config))
    return run, bert


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=2, help="probes per family")
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--naive-limit", type=int, default=40, help="edits timed one at a time (rates are per edit)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side, interleaved; the fastest counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, bert = build(tmp)
    stories = fuzz.held_out_stories([run], 3 * args.probes, 0)
    probe_list = [p for p in probes_lib.make_probes(stories, args.probes) if probes_lib.expressible(run.tokenizer, p)]
    oracle = fuzz.ORACLES["invariance"]
    readable = fuzz_edits.readable_words([run], keep_class=True)
    items = [(p.prompt, fuzz_edits.prompt_words(p.prompt), oracle.slots(p, fuzz_edits.prompt_words(p.prompt), readable, True))
             for p in probe_list]
    targets = fuzz.Targets({"model": run}, stories)

    def batched():
        started = time.perf_counter()
        scored = fuzz.score_edits(bert, items, args.candidates)
        mlm = time.perf_counter() - started
        variants = [fuzz.edited_probe(p, words, [e], False) for p, (_, words, _), per_slot in zip(probe_list, items, scored)
                    for edits in per_slot for e in edits]
        targets.observe(oracle, ["model"], variants)
        return len(variants), mlm, time.perf_counter() - started - mlm

    def naive():
        scored = fuzz.score_edits(bert, items, args.candidates)  # which edits (not timed: the same edits as batched)
        mlm = decoder = 0.0
        n = 0
        for p, (prompt, words, slots), per_slot in zip(probe_list, items, scored):
            for slot, edits in zip(slots, per_slot):
                for e in edits:
                    if n == args.naive_limit:
                        return n, mlm, decoder
                    started = time.perf_counter()
                    fuzz.score_edits(bert, [(prompt, words, [fuzz_edits.Slot(slot.positions, slot.old, (e.new,))])], 1)
                    middle = time.perf_counter()
                    # One plain jitted decoder call for the edit's candidate texts, as before shared prefixes.
                    probes_lib.score_probes(run, [fuzz.edited_probe(p, words, [e], False)])
                    mlm, decoder, n = mlm + middle - started, decoder + time.perf_counter() - middle, n + 1
        return n, mlm, decoder

    batched(), naive()  # warm-up: compile every shape both use
    rows = {}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("one at a time", naive)):
            n, mlm, decoder = fn()
            if name not in rows or mlm + decoder < sum(rows[name][1:]):
                rows[name] = (n, mlm, decoder)
    for name, (n, mlm, decoder) in rows.items():
        total = mlm + decoder
        print(f"{name:>14}: {n} candidate evaluations in {total:.2f} s = {n / total:8.1f}/s "
              f"(masked LM {mlm / total:.0%}, decoder {decoder / total:.0%})")
    speed = [rows[k][0] / (rows[k][1] + rows[k][2]) for k in rows]
    print(f"batched / one at a time: {speed[0] / speed[1]:.1f}x candidate evaluations per second "
          f"(target >= 10x); {len(probe_list)} probes; masked LM {np.divide(*[rows[k][1] / rows[k][0] for k in rows])**-1:.1f}x, "
          f"decoder {np.divide(*[rows[k][2] / rows[k][0] for k in rows])**-1:.1f}x per candidate")


if __name__ == "__main__":
    main()
