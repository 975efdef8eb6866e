"""The quickstart decoder on real text: the TinyStories sample, a 2,000-word top-word vocabulary.

python launch.py train --config experiments/configs/tinystories.py --workdir runs/tinystories \
    --config.data.source=../shared/corpora/tinystories_sample.txt      # or any UTF-8 file or folder
Expect: valid perplexity about 30 (accuracy 0.34) after 800 steps (about 8 minutes on a 2-core CPU) and
story-shaped samples ("once upon a time, there was a little boy named timmy ...") whose grammar holds for a
sentence or two.
"""

from pathlib import Path

from toyjax.config import Config, load_config_file


def get_config() -> Config:
    config = load_config_file(Path(__file__).with_name("quickstart.py"))  # the same decoder and training
    config.data.source = "../shared/corpora/tinystories_sample.txt"
    config.tokenizer.vocab_size = 2000
    config.train.steps = 800
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    return config
