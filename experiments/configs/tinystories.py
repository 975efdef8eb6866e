"""The quickstart decoder on real text: the TinyStories sample, a 2,000-word top-word vocabulary.

python launch.py train --config experiments/configs/tinystories.py --workdir runs/tinystories \
    --config.data.source=../shared/corpora/tinystories_sample.txt      # or any UTF-8 file or folder
Expect: valid perplexity about 30 (accuracy 0.34) after 800 steps (about 8 minutes on a 2-core CPU) and
story-shaped samples ("once upon a time, there was a little boy named timmy ...") whose grammar holds for a
sentence or two.
"""

from toyjax.config import Config


def get_config() -> Config:
    config = Config()
    config.data.source = "../shared/corpora/tinystories_sample.txt"
    config.tokenizer.vocab_size = 2000
    config.model.d_model = 128
    config.model.n_layers = 4
    config.model.n_heads = 4
    config.model.d_ff = 512
    config.model.max_len = 128
    config.train.steps = 800
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
