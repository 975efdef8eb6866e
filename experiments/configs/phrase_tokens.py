"""Phrase tokens vs word tokens: the same small decoder on TinyStories, 1k top words vs 1k words + 512 phrases.

python experiments/phrase_tokens.py --workdir runs/phrase_tokens
(trains both arms through toyjax.train.run; this file is the phrase arm, the word arm is the same with
tokenizer.kind="topword")
Expect: 1.22 words per phrase token, so the same token budget reads ~22 % more words; bits per word over the
whole validation split about 5.6 (word) vs 5.8 (phrase), i.e. phrases ~3 % worse per word, plus training words/s
and samples for both arms. ~8 min for both arms on a contended 2-core CPU (less on a quiet one). Reads the
TinyStories sample in ../shared/corpora; without it, add --config.data.source=stories (3,000 embedded stories).
"""

from pathlib import Path

from toyjax.config import Config

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "tinystories_sample.txt"


def get_config() -> Config:
    config = Config()
    config.data.source = str(CORPUS)  # missing: a CorpusError naming it and the override to use
    config.data.n_stories = 3000  # used only with --config.data.source=stories
    config.data.valid_fraction = 0.05
    config.tokenizer.kind = "phrase"
    config.tokenizer.vocab_size = 1024  # specials + top words, the same in both arms
    config.tokenizer.phrase_vocab_size = 512  # phrases added on top (phrase arm only)
    config.model.d_model = 128
    config.model.n_layers = 2
    config.model.n_heads = 4
    config.model.d_ff = 512
    config.model.max_len = 64
    config.train.steps = 400
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.eval_every = 200
    config.train.checkpoint_every = 400
    config.train.log_every = 50
    config.train.sample_length = 48
    return config
