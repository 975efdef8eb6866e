"""Masked-LM adaptation of all-MiniLM-L6-v2 on the TinyStories sample: 30 minutes on a CPU.

python launch.py bert-adapt --config experiments/configs/bert_adapt.py --workdir runs/bert_adapt
    [--config.bert_adapt.corpus=FILE --config.bert_adapt.mask_rate=0.25 --config.bert_adapt.seed=1 ...]
Expect (idle 2-core CPU, seed 0): held-out masked-word top-1 / top-5 0.004 / 0.084 at step 0, 0.377 / 0.620 at
step 200, 0.468 / 0.695 at step 600 and 0.474 / 0.728 at the end (step 1050, 29.6 minutes including evaluation;
787 held-out sentences). Seed 1 ends at 0.471 / 0.712. runs/bert_adapt/hf is then a BERT folder with an MLM head
for toyjax.bert.load, transformers.BertForMaskedLM and the "contextual" simplification strategy.
40 % of pieces are masked (80/10/10) rather than BERT's 15 %: faster per step on this budget (at step 300,
top-5 0.666 vs 0.620 at 15 %); details in docs/experiments/bert.md.
"""

from toyjax.config import Config


def get_config() -> Config:
    config = Config()
    adapt = config.bert_adapt
    adapt.corpus = "../shared/corpora/tinystories_sample.txt"  # relative to the working directory, as tinystories.py
    adapt.base = ""  # the packaged all-MiniLM-L6-v2 (no MLM head: a fresh tied head is trained)
    adapt.steps = 1050
    adapt.batch_size = 32
    adapt.seq_len = 64
    adapt.learning_rate = 3e-4
    adapt.warmup_steps = 30
    adapt.mask_rate = 0.4
    adapt.time_budget_min = 29.5  # wall time, evaluation and checkpoints included, across resumes
    adapt.eval_every = 200
    adapt.save_every = 100
    adapt.n_eval = 1000
    adapt.seed = 0
    return config
