"""Quickstart: a 4-layer decoder on a 1k top-word tokenization of the embedded stories.

python launch.py quickstart --workdir runs/quickstart
(the same as: python launch.py train --config experiments/configs/quickstart.py --workdir runs/quickstart)
Expect: valid perplexity about 1.6 (accuracy 0.83) and grammatical stories whose pronouns agree with their
names, in about 7 minutes on a 2-core CPU (1,000 steps at ~10k tokens/s). Object and place tracking is still
wrong often at this budget ("she had a pink boat ... she took her pink bag").
"""

from toyjax.config import Config


def get_config() -> Config:
    config = Config()
    config.data.source = "stories"
    config.data.n_stories = 6000
    config.tokenizer.vocab_size = 160
    config.model.d_model = 128
    config.model.n_layers = 4
    config.model.n_heads = 4
    config.model.d_ff = 512
    config.model.max_len = 128
    config.train.steps = 1000
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    return config
