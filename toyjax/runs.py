"""A run's workdir: what goes in it, how a run is prepared and resumed, and how it is loaded back.

    WORKDIR/config.json      the full config (vocab size filled in)
    WORKDIR/tokenizer/       the fitted tokenizer (tokenizer.json usable outside toyjax)
    WORKDIR/checkpoints/     orbax steps (see toyjax.checkpoints)
    WORKDIR/metrics.jsonl    one JSON object per log or eval step (see toyjax.metrics)
    WORKDIR/events.out.*     the same metrics as TensorBoard event files
    WORKDIR/samples.txt      samples from the final params
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
from toyjax.metrics import read_metrics
from toyjax.models.decoder import Decoder

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


def run_grammar(cfg: Config, tokenizer):
    """Returns the grammar tables a run on the structured domain trains, scores and samples with, else None.

    The one way to get them: anything that re-scores or samples a run must use these tables, not compile its own.
    """
    if cfg.data.source not in ("structured", "mixed"):
        return None
    from toyjax import grammar as grammar_lib

    # Alone, every document is a program; mixed with stories, a document enters the grammar at its first token.
    return grammar_lib.compile_grammar(grammar_lib.load_default_grammar(), tokenizer.token_to_id,
                                       free_text=cfg.data.source == "mixed")


def encode_for_run(cfg: Config, tokenizer, *splits: list[str]):
    """Returns (a TokenStream per list of documents, the run's grammar tables or None), as train.run feeds them.

    On the structured domain each stream carries the grammar state of every token (side["grammar_state"]) under
    run_grammar's tables: the masks and state features a run trains with, so whoever scores it uses the same.
    """
    from toyjax import grammar as grammar_lib

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


def write_samples(cfg: Config, model, params, tokenizer, grammar, *, n: int, seed: int = 0) -> list[str]:
    from toyjax.sample import cut_at_eos, sample

    if n <= 0:
        return []
    length = min(cfg.train.sample_length + 1, cfg.model.max_len)
    # Constrain only a model trained on the valid subset: a plain model's samples show what it learned alone.
    tokens = sample(model, params, [tokenizer.eos_id], n=n, length=length, key=jax.random.key(seed),
                    temperature=cfg.train.sample_temperature, grammar=grammar,
                    constrain=cfg.train.loss == "valid_subset")
    return [tokenizer.decode(row) for row in cut_at_eos(tokens, tokenizer.eos_id, skip=1)]


def plot_losses(workdir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "valid"):
        points = sorted((r["step"], r["loss"]) for r in records if r.get("split") == split)
        if points:
            ax.plot(*zip(*points), marker="o" if split == "valid" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(workdir.name)
    ax.legend()
    fig.tight_layout()
    path = workdir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finish(cfg, workdir: Path, model, params, tokenizer, grammar, result: dict, *, quiet: bool) -> None:
    samples = write_samples(cfg, model, params, tokenizer, grammar, n=cfg.train.n_samples, seed=cfg.train.seed)
    (workdir / "samples.txt").write_text("\n\n".join(samples) + "\n")
    plot_losses(workdir)
    log(f"valid loss {result['loss']:.4f}  perplexity {result['ppl']:.3f}  accuracy {result['accuracy']:.3f}  "
        f"({result['tokens_per_s']:.0f} train tokens/s)", quiet)
    for text in samples:
        log(f"  > {text}", quiet)


class Run(NamedTuple):
    config: Config
    params: dict
    tokenizer: object
    step: int
    model: Decoder


def load_run(workdir: str | Path, step: int | None = None) -> Run:
    """Returns the config, params, tokenizer and step of a trained run, for use from other JAX code."""
    from toyjax.tokenizers import load_tokenizer
    from toyjax.train import init_params

    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise FileNotFoundError(f"{workdir} is not a toyjax run (no config.json)")
    cfg = config_lib.load(workdir / "config.json")
    model = Decoder(cfg.model)
    abstract = jax.eval_shape(lambda: init_params(model, cfg))
    checkpoints = Checkpoints(workdir / "checkpoints", read_only=True)
    step, params, _, _ = checkpoints.restore(step, params_like=abstract)
    return Run(cfg, params, load_tokenizer(workdir / "tokenizer"), step, model)

