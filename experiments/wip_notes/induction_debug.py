import sys, time
import numpy as np, jax, jax.numpy as jnp
from experiments import induction_heads as ih
def periodic_rows(key, batch, length, vocab):
    token_key, period_key = jax.random.split(key)
    tokens = jax.random.randint(token_key, (batch, length), 0, vocab)
    period = jax.random.randint(period_key, (batch, 1), max(length // 8, 2), length // 2 + 1)
    return jnp.take_along_axis(tokens, jnp.arange(length)[None, :] % period, axis=1)
ih.repeated_rows = periodic_rows
if "--fixed" in sys.argv: sys.argv.remove("--fixed"); ih.repeated_rows = periodic_rows
from toyjax import config as config_lib
cfg = config_lib.apply_overrides(config_lib.load_config_file(ih.CONFIG), sys.argv[1:])
t = time.time()
run, losses = ih.train_model(cfg, quiet=False)
print("train s", time.time() - t)
half = cfg.model.max_len//2
clean, corr = ih.analysis_rows(123, 16, half, cfg.model.vocab_size)
prev, ind = ih.attention_scores(run, clean, half)
np.set_printoptions(precision=2, suppress=True, linewidth=200)
print("prev\n", prev, "\ninduction\n", ind)
print("ablation\n", ih.ablation_rise(run, clean, half))
lp = jax.nn.log_softmax(run[0].apply({"params": run[1]}, clean))
nll = -np.take_along_axis(np.asarray(lp[:, :-1]), clean[:, 1:, None], -1)[..., 0].mean(0)
print("nll by target pos", nll)
P = ih.views.attention_patterns(run, clean)
for l in range(P.shape[0]):
    for h in range(P.shape[2]):
        am = P[l, 0, h].argmax(-1)
        print(l, h, "offsets", np.arange(P.shape[-1]) - am, "max w", P[l,0,h].max(-1).round(2))
