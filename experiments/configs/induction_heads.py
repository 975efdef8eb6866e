"""Induction heads: a 2-layer attention-only decoder trained on repeated random token sequences.

python experiments/induction_heads.py --out runs/induction_heads [--config.train.steps=N --config.train.seed=S]
Expect: a previous-token head in layer 0 (attention from each position to the one before it near 1) and an
induction head in layer 1 (attention from the repeated copy's tokens to the token after the current token's earlier
occurrence), the same two heads ranked first by the attention views, by noising patching and by zero-ablation; the
loss on the repeated copy close to 0 while the unrepeated tokens stay near ln(vocab_size). Time and numbers:
docs/experiments/induction_heads.md.
The data (experiments/induction_heads.py, `RowSettings`): each training row is random tokens in which one random
segment appears twice; a share of rows instead follows the rule "the next token repeats the token before the
current one" (with noise), which makes a previous-token head useful on its own (as the statistics of text do for
language models) and shortens the plateau before the induction head forms.
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
