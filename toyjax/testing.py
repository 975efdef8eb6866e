"""Tiny configs for tests and smoke runs: seconds to train, same code paths as real runs."""

from __future__ import annotations

from toyjax.config import Config


def tiny_config(**sections) -> Config:
    """Returns a config for a 2-layer, 32-wide decoder on 300 embedded stories, 16-token windows."""
    config = Config()
    config.data.n_stories = 300
    config.data.valid_fraction = 0.1
    config.tokenizer.vocab_size = 120
    config.model.d_model = 32
    config.model.n_layers = 2
    config.model.n_heads = 2
    config.model.d_ff = 64
    config.model.max_len = 16
    config.train.steps = 8
    config.train.batch_size = 4
    config.train.warmup_steps = 2
    config.train.log_every = 2
    config.train.eval_every = 4
    config.train.eval_batches = 2
    config.train.checkpoint_every = 4
    config.train.n_samples = 1
    config.train.sample_length = 8
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


class BigramModel:
    """A stand-in for a Decoder whose logits are a table lookup on the previous token: log-probs known exactly.

    apply({"params": {"table": [vocab, vocab]}}, tokens) -> table[tokens]; causal and window-independent, so
    any windowing of a text must give the same per-token log-probs.
    """

    def apply(self, variables, tokens, *, state_features=None, deterministic=True):
        return variables["params"]["table"][tokens]


def bigram_run(tokenizer, logits_table, max_len: int = 16):
    """Returns a toyjax Run whose model is BigramModel with the given [vocab, vocab] logits table."""
    import jax.numpy as jnp

    from toyjax.runs import Run

    config = Config()
    config.model.max_len = max_len
    config.model.vocab_size = tokenizer.vocab_size
    return Run(config, {"table": jnp.asarray(logits_table, jnp.float32)}, tokenizer, 0, BigramModel())


def bigram_logits(tokenizer, texts, smoothing: float = 0.1):
    """Returns [vocab, vocab] log-probabilities of the add-`smoothing` bigram model of texts (<eos>-framed)."""
    import numpy as np

    counts = np.full((tokenizer.vocab_size, tokenizer.vocab_size), smoothing)
    for ids in tokenizer.encode_batch(list(texts)):
        seq = [tokenizer.eos_id, *ids, tokenizer.eos_id]
        np.add.at(counts, (seq[:-1], seq[1:]), 1.0)
    return np.log(counts / counts.sum(1, keepdims=True))
