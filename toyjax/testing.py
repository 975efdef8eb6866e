"""Tiny configs for tests and smoke runs: seconds to train, same code paths as real runs."""

from __future__ import annotations

from toyjax.config import Config, set_key, validate


def tiny_config(**sections) -> Config:
    """Returns a config for a 2-layer, 32-wide decoder on 300 embedded stories, 16-token windows.

    sections: overrides such as model={"d_model": 64}; an unknown key or a bad value is a ConfigError.
    """
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
            set_key(config, f"{section}.{key}", value)
    return validate(config)
