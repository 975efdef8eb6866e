"""Induction heads: a 2-layer attention-only decoder trained on repeated random token sequences.

python experiments/induction_heads.py --out runs/induction_heads [--config.train.steps=N --config.train.seed=S]
Meant to show: a previous-token head in layer 0 and an induction head in layer 1 (attention from the repeated copy
to the token after the current token's earlier occurrence), ranked first alike by attention, noising patching and
zero-ablation. Outcome (seed 0, ~2 min of training on a shared 2-core CPU): the model copies (loss 0.78 nats on the
second copy, 4.30 on random tokens), but through a shifted circuit: previous-token heads 0.1 and 0.3, a "three back"
head 0.2, and layer-1 heads attending one past the textbook target; ablation and noising agree on 0.2 and 1.2.
Details and the recipes tried: docs/experiments/induction_heads.md.
The data (experiments/induction_heads.py, `RowSettings`): each training row is random tokens in which one random
segment appears twice; a share of rows instead follows the rule "the next token repeats the token before the
current one" (with noise), which makes a previous-token head useful on its own (as the statistics of text do for
language models) and shortens the plateau before the model learns to copy.
"""

from toyjax.config import Config


def get_config() -> Config:
    config = Config()
    config.model.vocab_size = 64  # abstract symbols, no tokenizer
    config.model.d_model = 64
    config.model.n_layers = 2
    config.model.n_heads = 4
    config.model.max_len = 32
    config.model.ffn = "none"  # attention only: the circuit must live in the heads
    config.model.positions = "learned"
    config.model.dropout = 0.0
    config.train.steps = 6000
    config.train.batch_size = 64
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.0
    config.train.seed = 0
    return config
