"""Induction heads: a 2-layer attention-only decoder trained on repeated random token sequences.

python experiments/induction_heads.py --out runs/induction_heads
Expect: a previous-token head in layer 0 (mean attention to position - 1 near 1) and an induction head in layer 1
(mean attention to the token after the current token's earlier occurrence near 1), the same two heads picked by
attention, by noising patching (corrupted = first half replaced by fresh random tokens) and by zero-ablation
(each raises the loss on the repeated half by several nats); loss on the repeated half near 0 while the first,
unpredictable half stays at ln(vocab - 1). ~2 min on a busy 2-core CPU (1500 steps).
Each sequence is `max_len // 2` random tokens from `vocab_size` symbols, then the same tokens again.
"""

from toyjax.config import Config


def get_config() -> Config:
    config = Config()
    config.model.vocab_size = 64  # abstract symbols, no tokenizer
    config.model.d_model = 64
    config.model.n_layers = 2
    config.model.n_heads = 4
    config.model.max_len = 32  # 16 random tokens, then the same 16 again
    config.model.ffn = "none"  # attention only: the circuit must live in the heads
    config.model.positions = "learned"
    config.model.dropout = 0.0
    config.train.steps = 1500
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.01
    config.train.seed = 0
    return config
