"""Candidate-distribution throughput: toyjax Flax BERT (exact chain rule) vs the transformers fill-mask pipeline.

    python bench/bert_probe.py                                   # 8 sentences x 1000 candidates (quick)
    python bench/bert_probe.py --sentences 32 --candidates 2000 --model runs/bert_adapt/hf
Expect (2 quiet CPU cores, adapted model): 8 x 1000 (6 multi-piece) ~1.3x the pipeline, 16 x 1000 ~1.6x;
16 x 2000 (51 multi-piece) ~0.5x, because every distinct multi-piece prefix costs one more forward per sentence
while the pipeline does one; single-piece candidates only (--sentences 32 --candidates 300) ~5x. The last line
is the ceiling: the unavoidable matmul FLOPs at this machine's measured matmul peak, against the pipeline.

Both sides use the same weights. Without --model the packaged all-MiniLM-L6-v2 encoder gets a freshly
initialised tied MLM head (written to a temporary folder; speed does not depend on the head's values).
The pipeline (PyTorch, `targets=`, top_k = all) scores only each candidate's first piece and merges
candidates that share one; toyjax scores every piece and keeps them apart. Candidates are the most frequent
words of the corpus; sentences are held-out sentences with one word masked.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path


from toyjax import bert as bert_lib
from toyjax.bert import adapt, heads
from toyjax.bert import candidates as candidates_lib
from toyjax.bert.hf import write_folder
from toyjax.data.text import CorpusError, read_text_file

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinystories_sample.txt"


def model_folder(path: str | None, scratch: Path) -> Path:
    if path:
        return Path(path)
    bert = bert_lib.load()
    params = adapt.with_fresh_mlm_head(bert, adapt.corpus_windows(bert, ["a small corpus for the head bias ."], 8), seed=0)
    return write_folder(bert.config, params, scratch / "minilm_tied_head", bert.folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF BERT folder with an MLM head")
    parser.add_argument("--corpus", default=str(CORPUS), help="UTF-8 text: candidates and held-out sentences")
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--pipeline-batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    # No stand-in corpus: one repeated sentence would time a meaningless workload.
    hint = "pass --corpus FILE (the TinyStories sample lives in ../shared/corpora)"
    if not Path(args.corpus).is_file():
        sys.exit(f"error: corpus file {args.corpus} does not exist; {hint}")
    try:
        text = read_text_file(Path(args.corpus))
    except CorpusError as err:
        sys.exit(f"error: {err}; {hint}")
    words = collections.Counter(re.findall(r"[a-z]+", text.lower()))
    candidates = [w for w, _ in words.most_common(args.candidates)]
    _, held_out = adapt.split_corpus(text)
    sentences = heads.split_sentences(held_out or text.splitlines())
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(args.model, Path(scratch))
        bert = bert_lib.load(folder)
        examples = heads.masked_word_examples(bert, sentences, args.sentences, seed=7)
        texts = [bert.piece_tokenizer.decode([i for i in row if i not in (bert.cls_id, bert.sep_id, 0)],
                                             skip_special_tokens=False) for row in examples.ids]
        n_pieces = [len(bert.pieces(c)) for c in candidates]
        first_pieces = len({tuple(bert.pieces(c)[:1]) for c in candidates})
        print(f"model {folder}; {len(texts)} masked sentences x {len(candidates)} candidates; "
              f"{sum(n > 1 for n in n_pieces)} multi-piece, {len(candidates) - first_pieces} share a first piece")

        start = time.perf_counter()
        bert_lib.candidate_distributions(bert, texts, candidates)  # first call compiles the buckets
        first_call_seconds = time.perf_counter() - start
        start = time.perf_counter()
        ours = bert_lib.candidate_distributions(bert, texts, candidates)
        ours_seconds = time.perf_counter() - start

        import torch
        import transformers

        torch.set_num_threads(max(1, torch.get_num_threads()))
        fill_mask = transformers.pipeline("fill-mask", model=str(folder), tokenizer=str(folder), device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.logging.set_verbosity_error()
            fill_mask(texts, targets=candidates, top_k=len(candidates), batch_size=args.pipeline_batch_size)
            start = time.perf_counter()
            theirs = fill_mask(texts, targets=candidates, top_k=len(candidates), batch_size=args.pipeline_batch_size)
            theirs_seconds = time.perf_counter() - start

    pairs = len(texts) * len(candidates)
    ours_rate, theirs_rate = pairs / ours_seconds, pairs / theirs_seconds
    returned = sum(len(r) for r in (theirs if len(texts) > 1 else [theirs])) / len(texts)
    rows, tokens, flops = chain_rule_work(bert, texts, candidates)
    floor_seconds = flops / matmul_peak_flops(bert.config)
    print(f"toyjax (exact chain rule)   : {ours_rate:10.0f} sentence x candidate / s ({ours_seconds:.2f} s; "
          f"first call with compilation {first_call_seconds:.1f} s)")
    print(f"transformers fill-mask      : {theirs_rate:10.0f} sentence x candidate / s ({theirs_seconds:.2f} s, "
          f"first piece only, {returned:.0f} of {len(candidates)} candidates returned per sentence)")
    print(f"speed-up {ours_rate / theirs_rate:.2f}x")
    print(f"exact chain rule needs {rows} forward rows ({rows / len(texts):.1f} per sentence, {tokens} tokens, "
          f"{flops / 1e9:.0f} GFLOP in matmuls): at this machine's measured matmul peak that is >= {floor_seconds:.2f} s, "
          f"so at most {theirs_seconds / floor_seconds:.2f}x the pipeline here")
    return {"ours_per_s": ours_rate, "pipeline_per_s": theirs_rate, "speedup": ours_rate / theirs_rate,
            "floor_speedup": theirs_seconds / floor_seconds}


def chain_rule_work(bert, texts, candidates) -> tuple[int, int, float]:
    """Returns (rows, tokens, matmul FLOPs) of the exact chain rule: a lower bound on its work.

    Every layer but the last runs at every token; the last computes keys/values everywhere and the rest only at
    the scored position, where the head's dense layer and 30522-way decoder also run. Attention scores are left
    out, so this is a floor.
    """
    contexts = [candidates_lib.split_at_mask(bert, text) for text in texts]
    pieces = candidates_lib.candidate_pieces(bert, candidates)
    requests = [(t, p, len(p)) for t in range(len(contexts)) for p in pieces.values()]
    rows = candidates_lib.plan_rows(contexts, requests)[0]
    tokens = sum(len(left) + n_masks + len(right) + 2 for left, right, n_masks, _ in rows)
    c = bert.config
    hidden, inner, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    per_token_layer = 4 * hidden * hidden + 2 * hidden * inner
    macs = tokens * ((layers - 1) * per_token_layer + 2 * hidden * hidden)
    macs += len(rows) * (2 * hidden * hidden + 2 * hidden * inner + hidden * hidden + hidden * c.vocab_size)
    return len(rows), tokens, 2.0 * macs


def matmul_peak_flops(config, tokens: int = 1024, repeats: int = 20) -> float:
    """Returns the best FLOP/s of the encoder's largest matmul ([tokens, hidden] x [hidden, intermediate])."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.random.default_rng(0).normal(size=(tokens, config.hidden_size)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(config.hidden_size, config.intermediate_size)), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(x, w).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x, w).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * tokens * config.hidden_size * config.intermediate_size / best


if __name__ == "__main__":
    main()
