"""Heads on a frozen BERT encoder: features at masked words computed once (and cached), heads trained by jitted optax.

Two heads, both hidden -> classes:
  "linear": the users' head, logits = x W + b (384 x 30522 + 30522 parameters for BERT word-pieces);
  "bert":   BERT's own MLM head, logits = LayerNorm(gelu(x D + d)) E^T + b with E the frozen word embeddings
            (for a toyjax tokenizer's words, the mean embedding of each word's pieces).
Targets are BERT word-piece ids or the ids of a toyjax tokenizer (`word_targets`).

    examples = heads.masked_word_examples(bert, sentences, n=3000)
    features = heads.masked_features(bert, examples, cache_dir="runs/cache")   # [layers + 1, n, hidden]
    head, history = heads.train_head(features[3], examples.piece_targets, bert.config.vocab_size, "bert", decoder)
    heads.head_accuracy(head, valid_features[3], valid.piece_targets)          # {'top1': .., 'top5': ..}

Why the users' linear head "could not even overfit": see overfit_check and docs/experiments/bert.md. In short,
the raw features are badly scaled (a few dimensions of all-MiniLM-L6-v2 are large), and each full-batch step costs
a 30522-way softmax (~18 GFLOP for 512 examples), so a small learning rate never gets there in a sane time.
Standardised features + Adam at a large learning rate + full-batch steps overfit 512 examples in tens of steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from toyjax.bert.model import gelu_exact

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(lines: list[str], min_words: int = 5) -> list[str]:
    """Returns the sentences of the lines (split after . ! ?) with at least min_words words."""
    return [s for line in lines for s in _SENTENCE_END.split(line.strip()) if len(s.split()) >= min_words]


@dataclasses.dataclass
class MaskedExamples:
    ids: np.ndarray  # [n, max_len] word-pieces with one [MASK]
    attention_mask: np.ndarray  # [n, max_len]
    positions: np.ndarray  # [n] index of the [MASK]
    piece_targets: np.ndarray  # [n] the masked piece (single-piece words) or its first piece
    words: list[str]  # the masked word as text

    def __len__(self):
        return len(self.words)


def masked_word_examples(bert, sentences: list[str], n: int, seed: int = 0, max_len: int = 48,
                         single_piece_only: bool = True) -> MaskedExamples:
    """Returns up to n examples, each a sentence with one alphabetic word replaced by a single [MASK].

    single_piece_only keeps words that are one BERT piece (so top-k over BERT's vocabulary is the word
    accuracy); otherwise a multi-piece word's pieces are all replaced by the one [MASK] (word-level targets).
    """
    rng = np.random.default_rng(seed)
    rows, positions, pieces, words = [], [], [], []
    for index in rng.permutation(len(sentences)):
        encoding = bert.piece_tokenizer.encode(sentences[index], add_special_tokens=False)
        if len(encoding.ids) + 2 > max_len:
            continue
        spans = {}
        for i, word in enumerate(encoding.word_ids):
            spans.setdefault(word, []).append(i)
        choices = [span for span in spans.values()
                   if (len(span) == 1 or not single_piece_only) and encoding.tokens[span[0]].isalpha()]
        if not choices:
            continue
        span = choices[rng.integers(len(choices))]
        ids = encoding.ids[: span[0]] + [bert.mask_id] + encoding.ids[span[-1] + 1:]
        row = [bert.cls_id, *ids, bert.sep_id]
        rows.append(row + [bert.config.pad_token_id] * (max_len - len(row)))
        positions.append(1 + span[0])
        pieces.append(encoding.ids[span[0]])
        start, end = encoding.offsets[span[0]][0], encoding.offsets[span[-1]][1]
        words.append(sentences[index][start:end].lower())
        if len(rows) == n:
            break
    ids = np.array(rows, np.int32).reshape(-1, max_len)
    return MaskedExamples(ids, (ids != bert.config.pad_token_id).astype(np.int32), np.array(positions, np.int32),
                          np.array(pieces, np.int32), words)


def encoder_fingerprint(bert) -> str:
    """Returns a hex digest of a BERT's config and every parameter array (name, shape, dtype, bytes).

    Keyed by the weights themselves, a feature cache cannot serve one model's features for another: a different
    folder, the same folder re-adapted in place, or params changed in memory (hashing MiniLM's 90 MB: ~0.2 s).
    """
    digest = hashlib.sha1(repr(bert.config).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(bert.params)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)} {array.shape} {array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def masked_features(bert, examples: MaskedExamples, batch_size: int = 64, cache_dir: str | Path | None = None) -> np.ndarray:
    """Returns hidden states at the [MASK] for every layer [n_layers + 1, n, hidden] (0 = embeddings output)."""
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(examples.ids.tobytes() + encoder_fingerprint(bert).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"bert_features_{key}.npy"
        if cache.exists():
            return np.load(cache)
    chunks = []
    for start in range(0, len(examples), batch_size):
        sl = slice(start, start + batch_size)
        ids, mask = examples.ids[sl], examples.attention_mask[sl]
        pad = batch_size - len(ids)  # fixed batch shape: one compilation
        states = bert.layer_states(np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0))))
        positions = examples.positions[sl]
        chunks.append(np.stack([np.asarray(s)[np.arange(len(positions)), positions] for s in states]))
    features = np.concatenate(chunks, axis=1)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, features)
    return features


def word_targets(examples: MaskedExamples, tokenizer) -> np.ndarray:
    """Returns the masked words' ids in a toyjax tokenizer (unk for words outside its vocabulary)."""
    return np.array([tokenizer.token_to_id.get(word, tokenizer.unk_id) for word in examples.words], np.int32)


def word_decoder(bert, vocab: list[str]) -> np.ndarray:
    """Returns a tied decoder [len(vocab), hidden] for a word vocabulary: mean BERT embedding of each word's pieces."""
    table = np.asarray(bert.params["word_embeddings"]["embedding"])
    return np.stack([table[bert.pieces(word) or [bert.tokenizer.token_to_id("[UNK]")]].mean(0) for word in vocab])


# -------------------------------------------------------------------------------------------------- heads
def init_head(kind: str, hidden: int, n_classes: int, seed: int = 0) -> dict:
    """Returns the trainable parameters of a head ("linear" or "bert")."""
    if kind == "linear":
        return {"kernel": jnp.zeros((hidden, n_classes)), "bias": jnp.zeros((n_classes,))}
    if kind == "bert":
        return {"dense": 0.02 * jax.random.normal(jax.random.PRNGKey(seed), (hidden, hidden)),
                "dense_bias": jnp.zeros((hidden,)), "scale": jnp.ones((hidden,)), "shift": jnp.zeros((hidden,)),
                "bias": jnp.zeros((n_classes,))}
    raise ValueError(f"unknown head kind {kind!r}; expected 'linear' or 'bert'")


def head_logits(params: dict, features, decoder=None):
    """Returns logits [n, classes] of a head; `decoder` [classes, hidden] is the frozen tied matrix of "bert"."""
    if "kernel" in params:
        return features @ params["kernel"] + params["bias"]
    x = gelu_exact(features @ params["dense"] + params["dense_bias"])
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mean) / jnp.sqrt(var + 1e-12) * params["scale"] + params["shift"]
    return x @ decoder.T + params["bias"]


def standardiser(features: np.ndarray):
    """Returns (mean, std) of training features; heads see (x - mean) / std."""
    return features.mean(0), features.std(0) + 1e-6


def train_head(features, targets, n_classes: int, kind: str = "linear", decoder=None, steps: int = 200,
               learning_rate: float = 1e-2, batch_size: int | None = None, standardise: bool = True,
               optimizer: str = "adam", seed: int = 0, stop_at_train_top1: float | None = None,
               time_budget_s: float | None = None, compact_classes: bool = False) -> tuple[dict, list[dict]]:
    """Returns (head, history); head = {'params', 'mean', 'std', 'kind'}; history rows {step, loss, seconds[, train_top1]}.

    batch_size None = full batch. stop_at_train_top1 checks train accuracy every 5 steps and stops when reached.
    compact_classes (linear head only) trains exactly the same head far faster: from the zero initialisation,
    every class that never occurs as a target gets the same gradient at every step (Adam and SGD act
    elementwise), so all of them keep one shared weight column. Training K seen classes plus one "rest" class
    whose logit counts (n_classes - K) times in the softmax (+ log(n_classes - K)) follows the full head's
    trajectory (its gradient scaled back to one class's share); the result is expanded to n_classes columns.
    """
    if compact_classes and kind != "linear":
        raise ValueError("compact_classes is exact only for the zero-initialised linear head")
    full_n_classes, seen = n_classes, None
    logit_offset, gradient_scale = jnp.zeros((n_classes,)), jnp.ones((n_classes,))
    if compact_classes:
        seen, targets = np.unique(np.asarray(targets), return_inverse=True)
        n_rest = full_n_classes - len(seen)
        n_classes = len(seen) + (n_rest > 0)
        logit_offset = jnp.zeros((n_classes,)).at[len(seen):].set(np.log(max(n_rest, 1)))
        gradient_scale = jnp.ones((n_classes,)).at[len(seen):].set(1 / max(n_rest, 1))  # one class's share
    features, targets = jnp.asarray(features, jnp.float32), jnp.asarray(targets, jnp.int32)
    mean, std = standardiser(np.asarray(features)) if standardise else (np.zeros(features.shape[1]), np.ones(features.shape[1]))
    x_all = (features - mean) / std
    decoder = None if decoder is None else jnp.asarray(decoder, jnp.float32)
    params = init_head(kind, features.shape[1], n_classes, seed)
    tx = {"adam": optax.adam, "sgd": optax.sgd}[optimizer](learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step_fn(params, opt_state, x, y, decoder):
        def loss_fn(p):
            logits = head_logits(p, x, decoder)
            logits = logits * gradient_scale + jax.lax.stop_gradient(logits * (1 - gradient_scale)) + logit_offset
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    top1 = jax.jit(lambda p, x, y, decoder: (head_logits(p, x, decoder).argmax(-1) == y).mean())
    rng = np.random.default_rng(seed)
    history, start = [], time.time()
    for step in range(1, steps + 1):
        if batch_size is None:
            x, y = x_all, targets
        else:
            batch = rng.integers(0, len(targets), batch_size)
            x, y = x_all[batch], targets[batch]
        params, opt_state, loss = step_fn(params, opt_state, x, y, decoder)
        row = {"step": step, "loss": float(loss), "seconds": time.time() - start}
        if stop_at_train_top1 is not None and step % 5 == 0:
            row["train_top1"] = float(top1(params, x_all, targets, decoder))
        history.append(row)
        if row.get("train_top1", 0.0) >= (stop_at_train_top1 or 2.0):
            break
        if time_budget_s is not None and row["seconds"] > time_budget_s:
            break
    if seen is not None:
        params = _expand_classes(params, seen, full_n_classes)
    return {"params": params, "mean": mean, "std": std, "kind": kind, "decoder": decoder}, history


def _expand_classes(params: dict, seen: np.ndarray, n_classes: int) -> dict:
    """Returns the full linear head: seen classes' columns in place, the shared rest column everywhere else."""
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    rest = len(seen) if kernel.shape[1] > len(seen) else 0
    full_kernel = np.repeat(kernel[:, rest: rest + 1], n_classes, axis=1)
    full_bias = np.full((n_classes,), bias[rest])
    full_kernel[:, seen], full_bias[seen] = kernel[:, : len(seen)], bias[: len(seen)]
    return {"kernel": jnp.asarray(full_kernel), "bias": jnp.asarray(full_bias)}


def head_accuracy(head: dict, features, targets, ks=(1, 5), batch_size: int = 1024) -> dict:
    """Returns {'top1': .., 'top5': ..} of a trained head."""
    hits = {k: 0 for k in ks}
    for start in range(0, len(targets), batch_size):
        x = (jnp.asarray(features[start: start + batch_size]) - head["mean"]) / head["std"]
        logits = np.asarray(head_logits(head["params"], x, head["decoder"]))
        top = np.argsort(-logits, axis=-1)[:, : max(ks)]
        y = np.asarray(targets[start: start + batch_size])[:, None]
        for k in ks:
            hits[k] += int((top[:, :k] == y).any(-1).sum())
    return {f"top{k}": hits[k] / len(targets) for k in ks}


def overfit_check(bert, sentences: list[str], n: int = 512, kind: str = "linear", learning_rate: float = 1e-2,
                  layer: int = -1, time_budget_s: float = 60.0, standardise: bool = True, optimizer: str = "adam",
                  compact_classes: bool = False, features: np.ndarray | None = None, examples=None) -> dict:
    """Returns {'train_top1', 'steps', 'seconds', 'feature_seconds'}: fit n masked examples' BERT pieces, full batch.

    Feature extraction is timed separately (it is done once and cached); the head's clock stops at 99 % train
    top-1. The learning rate matters most: with standardised inputs and Adam at 1e-2 the 30522-way linear head
    memorises 512 examples in a few dozen full-batch steps; Adam at 1e-4 or SGD on raw features barely moves
    in the same time, which is what "cannot even overfit" looks like.
    """
    start = time.time()
    if features is None:
        examples = masked_word_examples(bert, sentences, n)
        features = masked_features(bert, examples)[layer]
    feature_seconds = time.time() - start
    decoder = np.asarray(bert.params["word_embeddings"]["embedding"]) if kind == "bert" else None
    head, history = train_head(features, examples.piece_targets, bert.config.vocab_size, kind, decoder, steps=10_000,
                               learning_rate=learning_rate, standardise=standardise, optimizer=optimizer,
                               stop_at_train_top1=0.99, time_budget_s=time_budget_s,
                               compact_classes=compact_classes)
    train_top1 = head_accuracy(head, features, examples.piece_targets)["top1"]
    return {"train_top1": train_top1, "steps": history[-1]["step"], "seconds": round(history[-1]["seconds"], 1),
            "feature_seconds": round(feature_seconds, 1), "n": len(examples), "kind": kind,
            "learning_rate": learning_rate, "optimizer": optimizer, "standardise": standardise,
            "compact_classes": compact_classes}
