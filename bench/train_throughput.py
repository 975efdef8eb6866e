"""Training throughput and model FLOP utilisation: toyjax's jitted train step against plain PyTorch, side by side.

    python bench/train_throughput.py                  # configs a and b, 30 timed steps each, 5 alternating rounds
    python bench/train_throughput.py --quick          # smoke run: 4 steps in 2 rounds
    python bench/train_throughput.py --configs b --steps 40 --rounds 8
    python bench/train_throughput.py --torch-compile  # also time torch.compile'd PyTorch (slow to compile on CPU)
    python bench/train_throughput.py --jax-attention sdpa   # toyjax with jax.nn.dot_product_attention instead

toyjax: `toyjax.train.make_train_step(Decoder(cfg), cfg, make_optimizer(cfg.train))` under
`jax.jit(..., donate_argnums=(0, 1))`, exactly as `toyjax.train.run` builds it. PyTorch: the same pre-LN GPT
(token + learned position embeddings, fused qkv Linear, causal softmax attention, tanh-GELU MLP, LayerNorm eps
1e-6, tied output) and the same optimizer (AdamW b1 0.9, b2 0.98, eps 1e-8, weight decay 0.1 on matrices only,
warm-up + cosine learning rate, global-norm clipping at 1.0), in eager mode. Before timing, toyjax's initial
parameters are copied into the PyTorch model and both losses are compared on one batch: the check that the two
really are the same model.

Model FLOPs per token (training = forward + backward = 3 x forward; multiply-add = 2 FLOPs):
    6 * N_matmul + 12 * n_layers * L * d_model
where N_matmul = n_layers * (4 d^2 + 2 d d_ff) + vocab * d (qkv, attention out, MLP, and the tied output
projection; embedding lookups, biases, LayerNorms, softmax excluded) and the second term is the q k^T and
(weights) v matmuls over the full L x L square (as computed; the causal half is not discounted).
MFU = FLOPs per token * tokens/s / peak, with peak = the best of several 2048 x 2048 x 2048 float32 matmuls in
jax measured in the same run, best over the start-up probe and the per-round probes below (the PyTorch matmul
peak is printed for reference too). On a shared machine the
load drifts, so each timing round is also preceded by a short peak probe and "MFU per round" is the median over
rounds of (that round's FLOP rate / the peak probed just before it).

Timing: each framework compiles/warms up first, then the timed steps run in --rounds short rounds, alternating
jax and torch, each round ended by block_until_ready (jax) so no work is left queued. Reported: tokens/s from
the best round (closest to an unloaded machine) and the median of the per-round toyjax/torch ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


import jax
import jax.numpy as jnp
import numpy as np

from toyjax.config import Config, ModelConfig, TrainConfig
from toyjax.models import registry
from toyjax.models.decoder import Decoder
from toyjax.models.decoder import init_params
from toyjax.train import cross_entropy, make_optimizer, make_train_step, step_key

CONFIGS = {  # name -> (model fields, batch size)
    "a": (dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_len=128), 32),
    "b": (dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, d_ff=1024, max_len=256), 16),
}


# -- FLOPs and peak ---------------------------------------------------------------------------------------


def matmul_params(m: ModelConfig) -> int:
    """Returns the number of weights that take part in a matmul per token (tied output counted once)."""
    return m.n_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff) + m.vocab_size * m.d_model


def flops_per_token(m: ModelConfig) -> int:
    """Returns training FLOPs per token: 6 N_matmul + 12 n_layers L d (see the module docstring)."""
    return 6 * matmul_params(m) + 12 * m.n_layers * m.max_len * m.d_model


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def jax_matmul_rate(n: int) -> callable:
    """Returns probe(repeats) -> the best float32 n x n x n jax matmul rate in FLOP/s over that many calls."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return lambda repeats: 2 * n**3 / best_seconds(lambda: matmul(a, b).block_until_ready(), repeats)


def matmul_peak(n: int, repeats: int, use_torch: bool) -> tuple[float, float | None]:
    """Returns the best float32 n x n x n matmul rate in FLOP/s for jax (and torch, or None)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    jax_peak = jax_matmul_rate(n)(repeats)
    torch_peak = None
    if use_torch:
        import torch

        ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        torch_peak = 2 * n**3 / best_seconds(lambda: ta @ tb, repeats)
    return jax_peak, torch_peak


# -- toyjax side --------------------------------------------------------------------------------------------


@registry.register_attention("bench_sdpa")
def _sdpa_attention(q, k, v, *, causal, cfg):
    """jax.nn.dot_product_attention: an alternative formulation measured with --jax-attention sdpa."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal), {}


def make_config(name: str, attention: str) -> tuple[Config, int]:
    fields, batch = CONFIGS[name]
    cfg = Config(model=ModelConfig(**fields, attention=attention), train=TrainConfig(batch_size=batch, steps=10_000))
    return cfg, batch


def synthetic_batches(cfg: Config, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    shape = (cfg.train.batch_size, cfg.model.max_len + 1)
    windows = [rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32) for _ in range(count)]
    return [{"inputs": w[:, :-1], "targets": w[:, 1:]} for w in windows]


class JaxRunner:
    """Owns toyjax params and optimizer state; run(n) does n train steps and waits for them."""

    def __init__(self, cfg: Config, batches: list[dict], donate: bool = True):
        model = Decoder(cfg.model)
        tx = make_optimizer(cfg.train)
        self.params = init_params(model, cfg.train.seed)
        self.initial_params = jax.tree.map(np.array, self.params)  # host copy before donation
        self.opt_state = tx.init(self.params)
        self.step = jax.jit(make_train_step(model, cfg, tx), donate_argnums=(0, 1) if donate else ())
        self.batches = [jax.tree.map(jnp.asarray, b) for b in batches]
        self.keys = [step_key(cfg.train.seed, s) for s in range(len(batches))]
        self.count = 0
        self.model = model

    def first_loss(self) -> float:
        logits = self.model.apply({"params": self.initial_params}, self.batches[0]["inputs"])
        return float(cross_entropy(logits, self.batches[0]["targets"]).mean())

    def run(self, n: int) -> None:
        for _ in range(n):
            i = self.count % len(self.batches)
            self.params, self.opt_state, metrics = self.step(self.params, self.opt_state, self.batches[i], self.keys[i])
            self.count += 1
        jax.block_until_ready((self.params, metrics))


# -- PyTorch side ------------------------------------------------------------------------------------------


def build_torch(m: ModelConfig, t: TrainConfig):
    """Returns (model, optimizer, scheduler) for the same pre-LN GPT and AdamW as toyjax."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_attention = nn.LayerNorm(m.d_model, eps=1e-6)  # flax LayerNorm's epsilon
            self.qkv = nn.Linear(m.d_model, 3 * m.d_model)
            self.out = nn.Linear(m.d_model, m.d_model)
            self.ln_ffn = nn.LayerNorm(m.d_model, eps=1e-6)
            self.up = nn.Linear(m.d_model, m.d_ff)
            self.down = nn.Linear(m.d_ff, m.d_model)

        def forward(self, x):
            b, length, d = x.shape
            q, k, v = self.qkv(self.ln_attention(x)).view(b, length, 3, m.n_heads, d // m.n_heads).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            x = x + self.out(a.transpose(1, 2).reshape(b, length, d))
            return x + self.down(F.gelu(self.up(self.ln_ffn(x)), approximate="tanh"))  # flax nn.gelu is tanh

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(m.vocab_size, m.d_model)
            self.position = nn.Embedding(m.max_len, m.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(m.n_layers))
            self.ln_final = nn.LayerNorm(m.d_model, eps=1e-6)

        def forward(self, tokens, targets):
            x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = F.linear(self.ln_final(x), self.embed.weight)  # tied output projection
            return F.cross_entropy(logits.view(-1, m.vocab_size), targets.reshape(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.learning_rate, betas=(0.9, t.b2), eps=1e-8)

    def schedule(step):  # optax.warmup_cosine_decay_schedule(0, lr, warmup, steps, lr * min_lr_ratio) / lr
        if step < t.warmup_steps:
            return step / t.warmup_steps
        progress = min((step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1), 1.0)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def load_flax_params(model, params, m: ModelConfig) -> None:
    """Copies toyjax's parameter tree into the PyTorch model (flax kernels are [in, out], torch [out, in])."""
    import torch

    def put(target, value):
        value = torch.from_numpy(np.asarray(value, np.float32).copy())
        assert target.shape == value.shape, (target.shape, value.shape)
        target.data.copy_(value)

    def dense(linear, p):
        put(linear.weight, np.asarray(p["kernel"]).reshape(linear.in_features, linear.out_features).T)
        put(linear.bias, np.asarray(p["bias"]).reshape(-1))

    def norm(layer, p):
        put(layer.weight, p["scale"])
        put(layer.bias, p["bias"])

    put(model.embed.weight, params["embed"]["embedding"])
    put(model.position.weight, params["position"]["embedding"])
    norm(model.ln_final, params["ln_final"])
    for i, block in enumerate(model.blocks):
        p = params[f"block_{i}"]
        norm(block.ln_attention, p["ln_attention"])
        norm(block.ln_ffn, p["ln_ffn"])
        dense(block.qkv, p["attention"]["qkv"])  # kernel [d, 3, heads, head_dim] -> [d, 3d]
        dense(block.out, p["attention"]["out"])  # kernel [heads, head_dim, d] -> [d, d]
        dense(block.up, p["ffn"]["up"])
        dense(block.down, p["ffn"]["down"])


class TorchRunner:
    def __init__(self, cfg: Config, batches: list[dict], jax_params, compile_model: bool = False):
        import torch

        self.torch = torch
        self.model, self.optimizer, self.scheduler = build_torch(cfg.model, cfg.train)
        load_flax_params(self.model, jax_params, cfg.model)
        self.batches = [{k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()} for b in batches]
        self.grad_clip = cfg.train.grad_clip
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.count = 0

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def first_loss(self) -> float:
        with self.torch.no_grad():
            return float(self.model(self.batches[0]["inputs"], self.batches[0]["targets"]))

    def run(self, n: int) -> None:
        for _ in range(n):
            batch = self.batches[self.count % len(self.batches)]
            loss = self.forward(batch["inputs"], batch["targets"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.count += 1


# -- the benchmark ----------------------------------------------------------------------------------------


def bench_config(name: str, args, peak: float) -> dict:
    cfg, batch = make_config(name, "dense" if args.jax_attention == "registry" else "bench_sdpa")
    m = cfg.model
    tokens_per_step = batch * m.max_len
    batches = synthetic_batches(cfg, 4)
    runners = {"toyjax": JaxRunner(cfg, batches, donate=not args.no_donate)}
    n_jax = sum(x.size for x in jax.tree.leaves(runners["toyjax"].initial_params))
    print(f"\nconfig {name}: vocab {m.vocab_size}, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, "
          f"d_ff {m.d_ff}, context {m.max_len}, batch {batch} ({tokens_per_step} tokens/step)")
    print(f"  params: toyjax {n_jax:,}", end="")
    if args.torch:
        runners["torch eager"] = TorchRunner(cfg, batches, runners["toyjax"].initial_params)
        n_torch = runners["torch eager"].n_params()
        print(f", torch {n_torch:,} ({'match' if n_torch == n_jax else 'MISMATCH'})", end="")
        jl, tl = runners["toyjax"].first_loss(), runners["torch eager"].first_loss()
        print(f"; initial loss on one batch, same weights: toyjax {jl:.6f}, torch {tl:.6f} (|diff| {abs(jl - tl):.1e})")
        if n_torch != n_jax or abs(jl - tl) > 1e-3:
            raise SystemExit("the PyTorch model is not the toyjax model: fix build_torch before trusting the numbers")
        if args.torch_compile:
            runners["torch compile"] = TorchRunner(cfg, batches, runners["toyjax"].initial_params, compile_model=True)
    else:
        print()
    fpt = flops_per_token(m)
    print(f"  FLOPs/token: 6 x {matmul_params(m):,} + 12 x {m.n_layers} x {m.max_len} x {m.d_model} = {fpt / 1e6:.2f} M")
    for label, runner in runners.items():  # compile / warm up
        start = time.perf_counter()
        runner.run(2)
        print(f"  warm-up {label}: {time.perf_counter() - start:.1f} s (2 steps incl. compile)")
    per_round = max(1, args.steps // args.rounds)
    seconds = {label: [] for label in runners}
    probe, round_peaks = jax_matmul_rate(args.peak_size), []
    for r in range(args.rounds):
        round_peaks.append(probe(2))  # the load changes: MFU per round uses the peak measured just before it
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]  # alternate who goes first
        for label in order:
            start = time.perf_counter()
            runners[label].run(per_round)
            seconds[label].append(time.perf_counter() - start)
    peak = max(peak, *round_peaks)  # the best of every probe in the run: a load spike at start-up must not inflate MFU
    result = {}
    for label, times in seconds.items():
        best = tokens_per_step * per_round / min(times)
        median = tokens_per_step * per_round / statistics.median(times)
        round_mfu = statistics.median(fpt * tokens_per_step * per_round / t / p for t, p in zip(times, round_peaks))
        result[label] = (best, median, fpt * best / peak, round_mfu)
    print(f"  {'framework':14s} {'best tok/s':>11s} {'median tok/s':>13s} {'MFU best/peak':>14s} {'MFU per round':>14s}"
          f"   ({args.rounds} rounds of {per_round} steps; round peaks {min(round_peaks) / 1e9:.0f}-"
          f"{max(round_peaks) / 1e9:.0f} GFLOP/s)")
    for label, (best, median, mfu, round_mfu) in result.items():
        print(f"  {label:14s} {best:11.0f} {median:13.0f} {mfu:14.1%} {round_mfu:14.1%}")
    for label in runners:
        if label != "toyjax":
            ratios = [t / j for j, t in zip(seconds["toyjax"], seconds[label])]
            print(f"  toyjax / {label}: {result['toyjax'][0] / result[label][0]:.2f}x best-round tokens/s, "
                  f"{statistics.median(ratios):.2f}x median of per-round ratios (target >= 1.2x vs eager)")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="a,b", help="comma-separated subset of: " + ",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per framework and config")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds the timed steps are split into")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps in 2 rounds, small matmul peak")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch reference")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile (slow on CPU)")
    parser.add_argument("--jax-attention", choices=("registry", "sdpa"), default="registry",
                        help="registry: toyjax's 'dense' kind; sdpa: jax.nn.dot_product_attention (experiment)")
    parser.add_argument("--no-donate", action="store_true", help="jit without donate_argnums (experiment)")
    parser.add_argument("--threads", type=int, default=0,
                        help="0: each framework's default; N: torch.set_num_threads(N) and XLA intra-op threads N")
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the n x n x n matmul peak")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    if args.quick:
        args.steps, args.rounds, args.peak_size = min(args.steps, 4), min(args.rounds, 2), min(args.peak_size, 512)
    if args.torch:
        try:
            import torch
        except ImportError:
            print("torch is not installed: skipping the PyTorch side (toyjax numbers only)")
            args.torch = args.torch_compile = False
    if args.threads:  # must happen before jax creates its CPU backend (the first jax.devices() below)
        flags = f"intra_op_parallelism_threads={args.threads}"
        if args.threads == 1:
            flags = "--xla_cpu_multi_thread_eigen=false " + flags
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
        if args.torch:
            torch.set_num_threads(args.threads)
    threads = f", torch threads {torch.get_num_threads()}" if args.torch else ""
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)){threads}")
    peak, torch_peak = matmul_peak(args.peak_size, 3 if args.quick else 6, args.torch)
    n = args.peak_size
    print(f"matmul peak, float32 {n}^3, best of several: jax {peak / 1e9:.1f} GFLOP/s"
          + (f", torch {torch_peak / 1e9:.1f} GFLOP/s (MFU below uses the jax peak)" if torch_peak else ""))
    summary = {name: bench_config(name, args, peak) for name in names}
    print("\nsummary:")
    for name, result in summary.items():
        line = f"  config {name}: toyjax {result['toyjax'][0]:.0f} tok/s, MFU {result['toyjax'][2]:.1%} (per round {result['toyjax'][3]:.1%})"
        for label, (best, _, mfu, _) in result.items():
            if label != "toyjax":
                line += f"; {label} {best:.0f} tok/s, MFU {mfu:.1%}, ratio {result['toyjax'][0] / best:.2f}x"
        print(line)
    print("(measured on a shared machine: compare ratios, not absolute numbers)")


if __name__ == "__main__":
    main()
