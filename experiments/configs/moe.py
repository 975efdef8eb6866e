"""Mixture-of-experts decoder (Shazeer et al. 2017 noisy top-k gating): 8 experts, top-2, each expert half the
dense d_ff, so the active feed-forward parameters per token equal those of a dense decoder with d_ff 256.

python launch.py train --config experiments/configs/moe.py --workdir runs/moe
python experiments/moe_replication.py --out runs/moe_replication     # dense vs 4/8/16 experts, k = 1, 2
Expect: the replication at this config's budget (8 arms x 1500 steps) takes about an hour on a 2-core CPU (not yet
run). A small one, ~5 min for 8 arms on a shared 2-core machine,
    python experiments/moe_replication.py --steps 150 \
        --arms dense,4x1,16x1,4x1-switch,16x1-switch,8x2,16x2,8x2-noaux
measured: dense valid ppl 109.6; every MoE arm worse at this budget (+4.5 % for 16x1-switch up to +17.7 % for noisy
16x1); noisy top-2 usage entropy 0.88 with aux losses vs 0.70 without; noisy top-1 poorly balanced (0.25 with 16
experts: the gate is constant 1 at k = 1) while Switch top-1 stays near 0.9.
Dropless (capacity_factor 0), so no arm loses tokens. Reads the TinyStories sample in ../shared/corpora; without
it, add --config.data.source=stories for the embedded stories (6,000 of them).
"""

from pathlib import Path

from toyjax.config import Config

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "tinystories_sample.txt"


def get_config() -> Config:
    config = Config()
    config.data.source = str(CORPUS)  # missing: a CorpusError naming it and the override to use
    config.data.n_stories = 6000  # used only with --config.data.source=stories
    config.tokenizer.vocab_size = 512
    config.model.d_model = 64
    config.model.n_layers = 2
    config.model.n_heads = 2
    config.model.d_ff = 128  # per expert: top_k x 128 = the dense arm's 256
    config.model.max_len = 64
    config.model.ffn = "moe"
    config.model.moe.n_experts = 8
    config.model.moe.top_k = 2
    config.model.moe.router = "noisy_topk"
    config.model.moe.capacity_factor = 0.0  # dropless
    config.model.moe.dispatch = "auto"
    config.train.steps = 1500
    config.train.batch_size = 16
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 50
    config.train.eval_every = 500
    config.train.eval_batches = 8
    config.train.checkpoint_every = 500
    return config
