"""A run's data as training feeds it: its grammar tables, its encoded streams and the validation batches it scores.

Everything that re-scores or samples a run goes through these functions, so it sees exactly what training saw.
"""

from __future__ import annotations

import numpy as np

from toyjax import grammar as grammar_lib
from toyjax.config import Config
from toyjax.config_rules import GRAMMAR_SOURCES
from toyjax.data import pipeline


def run_grammar(cfg: Config, tokenizer):
    """Returns the grammar tables a run on the structured domain trains, scores and samples with, else None.

    The one way to get them: anything that re-scores or samples a run must use these tables, not compile its own.
    """
    if cfg.data.source not in GRAMMAR_SOURCES:
        return None
    # Alone, every document is a program; mixed with stories, a document enters the grammar at its first token.
    return grammar_lib.compile_grammar(grammar_lib.load_default_grammar(), tokenizer.token_to_id,
                                       free_text=cfg.data.source == "mixed")


def encode_for_run(cfg: Config, tokenizer, *splits: list[str]):
    """Returns (a TokenStream per list of documents, the run's grammar tables or None), as train.run feeds them.

    On the structured domain each stream carries the grammar state of every token (side["grammar_state"]) under
    run_grammar's tables: the masks and state features a run trains with, so whoever scores it uses the same.
    """
    streams = tuple(pipeline.TokenStream.encode(tokenizer, docs) for docs in splits)
    tables = run_grammar(cfg, tokenizer)
    if tables is not None:
        for stream in streams:
            stream.side["grammar_state"] = np.asarray(grammar_lib.annotate(tables, stream.tokens, tokenizer.vocab),
                                                      np.int32)
    return streams, tables


def scored_batches(cfg: Config, valid_stream: pipeline.TokenStream) -> list[dict]:
    """Returns the validation batches train.run scores: train.eval_batches batches of evenly spaced windows."""
    return valid_stream.eval_batches(cfg.train.eval_batches, batch_size=cfg.train.batch_size, length=cfg.model.max_len)


def validation_batches(cfg: Config, tokenizer) -> tuple[list[dict], object]:
    """Returns (the validation batches train.run scores, the run's grammar tables or None) for a run's config."""
    docs = pipeline.load_documents(cfg.data)
    _, valid_docs = pipeline.split_train_valid(docs, cfg.data.valid_fraction)
    (valid_stream,), tables = encode_for_run(cfg, tokenizer, valid_docs)
    return scored_batches(cfg, valid_stream), tables
