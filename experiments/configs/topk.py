"""Top-k attention decoder: the quickstart model with each query keeping only its 8 largest attention scores.

python launch.py train --config experiments/configs/topk.py --workdir runs/topk
python experiments/topk_attention.py --out runs/topk_attention      # the sweep: dense and k in {1,...,32}
Expect (measured, small sweep below, ~5 min on a busy 2-core CPU, one seed): valid perplexity dense 2.08;
k = 1: 5.58 (top-1 gives q and k no gradient); k = 2: 2.15; k = 4 ... 32: 2.06-2.09, i.e. dense quality from
k = 4 up; top-k attention entropy 0.55 (k=2) to 2.16 (k=32) nats vs 2.25 for dense.
    python experiments/topk_attention.py --out runs/topk_attention_small --steps 300 \
        --config.model.n_layers=2 --config.model.d_model=64 --config.model.d_ff=256 --config.data.n_stories=2000 \
        --config.model.max_len=64 --config.train.batch_size=16 --config.train.warmup_steps=30
The full-budget sweep (this config as is, 7 runs) is untested: roughly an hour, estimated.
"""

from pathlib import Path

from toyjax.config import Config, load_config_file


def get_config() -> Config:
    config = load_config_file(Path(__file__).with_name("quickstart.py"))  # same data, tokenizer, model size
    config.model.attention = "topk"
    config.model.attention_top_k = 8
    config.model.attention_query_chunk = 0  # 128 tokens: one chunk; set e.g. 256 for long contexts
    config.train.steps = 1200
    config.train.eval_every = 300
    config.train.checkpoint_every = 300
    return config
