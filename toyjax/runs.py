"""A run's workdir: what goes in it, how a run is prepared and resumed, and how it is loaded back.

    WORKDIR/config.json      the full config (vocab size filled in)
    WORKDIR/tokenizer/       the fitted tokenizer (tokenizer.json usable outside toyjax)
    WORKDIR/checkpoints/     orbax steps (see toyjax.checkpoints)
    WORKDIR/metrics.jsonl    one JSON object per log or eval step (see toyjax.metrics)
    WORKDIR/events.out.*     the same metrics as TensorBoard event files
    WORKDIR/samples.txt      samples from the final params   (written by toyjax.report.finish)
    WORKDIR/loss.png         train and valid loss curves
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from toyjax import config as config_lib
from toyjax.checkpoints import Checkpoints
from toyjax.config import Config
from toyjax.data import pipeline
from toyjax.data.run_data import encode_for_run
from toyjax.metrics import read_metrics
from toyjax.models.decoder import Decoder, init_params

# Keys whose change makes an existing workdir a different experiment (train.* may change, e.g. more steps).
_IDENTITY_SECTIONS = ("data", "tokenizer", "model")


def log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def progress(start: int, total: int, quiet: bool):
    return tqdm(total=total, initial=start, desc="train", unit="step", disable=quiet, dynamic_ncols=True)


def differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Returns one line per key whose value differs between two nested dicts ('a.b: workdir has X, config asks Y')."""
    out = []
    for key in sorted(saved.keys() | wanted.keys()):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: workdir has {a!r}, config asks {b!r}")
    return out


def _check_workdir(workdir: Path) -> None:
    """Raises ConfigError if workdir, or the nearest of its parents that exists, is not a directory."""
    existing = next(p for p in (workdir, *workdir.parents) if p.exists())
    if not existing.is_dir():
        what = "is an existing file" if existing == workdir else f"is inside {existing}, an existing file"
        raise config_lib.ConfigError(f"workdir {workdir} {what}, not a directory; "
                                     "give a new directory or one that holds a run")


def prepare(cfg: Config, workdir: Path, *, quiet: bool = False, write: bool = True):
    """Returns (config, tokenizer, (train_stream, valid_stream), grammar tables or None) for a workdir.

    write=False reads the workdir without writing to it (every process but the first of a multi-process run).
    """
    from toyjax.tokenizers import load_tokenizer

    cfg = config_lib.from_dict(cfg.to_dict())  # a private copy: filling in sizes must not touch the caller's
    _check_workdir(workdir)
    docs = pipeline.load_documents(cfg.data)
    train_docs, valid_docs = pipeline.split_train_valid(docs, cfg.data.valid_fraction)
    tokenizer_dir = workdir / "tokenizer"
    fit_here = not (tokenizer_dir / "toyjax_tokenizer.json").is_file()
    if fit_here:
        log(f"fitting a {cfg.tokenizer.kind} tokenizer on {len(train_docs)} documents", quiet)
        tokenizer = pipeline.fit_tokenizer(cfg.tokenizer, train_docs)
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size != tokenizer.vocab_size:
        raise config_lib.ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer in {tokenizer_dir} "
                                     f"has {tokenizer.vocab_size} tokens; leave model.vocab_size=0 to take it from there")
    streams, grammar = encode_for_run(cfg, tokenizer, train_docs, valid_docs)
    if grammar is not None:
        cfg.model.grammar_feature_sizes = tuple(int(s) for s in grammar.feature_sizes)
    saved_path = workdir / "config.json"
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        wanted = json.loads(cfg.to_json())
        problems = [p for s in _IDENTITY_SECTIONS for p in differences(saved.get(s, {}), wanted[s], f"{s}.")]
        if problems:
            raise config_lib.ConfigError(f"{workdir} holds a different run; use another --workdir or the same config:\n  "
                                         + "\n  ".join(problems))
    # Only now, with the config, corpus, tokenizer and grammar all usable, does the workdir get written.
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
        if fit_here:
            tokenizer.save(tokenizer_dir)
        config_lib.save(cfg, saved_path)
    log(f"tokens: {len(streams[0].tokens):,} train, {len(streams[1].tokens):,} valid; vocab {tokenizer.vocab_size}", quiet)
    return cfg, tokenizer, streams, grammar


def mean_throughput(workdir: Path) -> float:
    rates = [r["tokens_per_s"] for r in read_metrics(workdir) if r.get("split") == "train"]
    return float(np.median(rates[1:] or rates)) if rates else 0.0  # the first interval holds compilation


class Run(NamedTuple):
    config: Config
    params: dict
    tokenizer: object
    step: int
    model: Decoder


def load_run(workdir: str | Path, step: int | None = None) -> Run:
    """Returns the config, params, tokenizer and step of a trained run, for use from other JAX code."""
    from toyjax.tokenizers import load_tokenizer

    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir} is not a toyjax run (no config.json)")
    cfg = config_lib.load(workdir / "config.json")
    model = Decoder(cfg.model)
    abstract = jax.eval_shape(lambda: init_params(model, cfg.train.seed))
    checkpoints = Checkpoints(workdir / "checkpoints", read_only=True)
    step, params, _, _ = checkpoints.restore(step, params_like=abstract)
    return Run(cfg, params, load_tokenizer(workdir / "tokenizer"), step, model)

