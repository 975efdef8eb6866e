"""Three models, one tokenization: dense, top-k attention and MoE decoders compared on held-out stories and probes.

python experiments/three_models.py --out runs/three_models [--n-probes 100 --config.KEY=V ...]
This file is the dense arm and holds every arm's settings; the script derives the other two by switching one part:
  topk   model.attention = "topk" (model.attention_top_k = 8 keys per query)
  moe    model.ffn = "moe": 4 experts, noisy top-2 gating, each expert d_ff = d_ff / 2, so the active feed-forward
         parameters per token equal the dense arm's. Dropless (capacity_factor 0), so the three arms differ only
         in their parts, not in dropped tokens.
The quickstart model (d_model 128, 4 layers, 128-token windows, 160-word vocabulary on 6,000 stories) with 500
steps per arm instead of 1,000. The 160-word vocabulary keeps every name, object and place of the stories (only
rare synonyms are simplified), so every probe is expressible.
Expect: about 15 min on an idle 2-core CPU, estimated, not yet measured end to end: training costs 0.66 (dense),
0.68 (topk) and 0.85 (moe) CPU-seconds per step (measured on a shared 2-core machine), ~1,100 CPU-s for 3 x 500
steps, i.e. ~11-12 min at the quickstart's 0.41 s per dense step, plus data, evaluation and comparison (~3 min).
OUT/findings.md reports the measured time, bits/word per arm, and which probe families (owner, location, pronoun)
separate the arms by more than two standard errors at 100 probes per family.
"""

from pathlib import Path

from toyjax.config import Config, load_config_file


def get_config() -> Config:
    config = load_config_file(Path(__file__).with_name("quickstart.py"))  # same data, tokenizer and model size
    config.model.attention_top_k = 8  # used by the topk arm
    config.model.moe.n_experts = 4  # used by the moe arm (model.ffn = "moe")
    config.model.moe.top_k = 2
    config.model.moe.router = "noisy_topk"
    config.model.moe.capacity_factor = 0.0  # dropless, see the docstring
    config.train.steps = 500
    config.train.warmup_steps = 50
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    return config
