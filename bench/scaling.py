"""Step time and tokens/s of the same training step on 1, 2, 4 and 8 simulated CPU devices, side by side.

    python bench/scaling.py                 # data parallel, a small dense decoder
    python bench/scaling.py --mesh fsdp     # the same devices as an FSDP axis
    python bench/scaling.py --moe --mesh expert
    python bench/scaling.py --quick         # smoke run

Simulated devices (--xla_force_host_platform_device_count) share this machine's cores, so more devices cannot
be faster here: this measures the overhead of the mesh (partitioned program, collectives), not a speed-up.
One device is the plain jitted step with no mesh (toyjax.sharding.make_layout returns None), i.e. today's path.
Rounds alternate the order of the device counts, and each step is waited on (collectives of simulated devices
can deadlock on a few cores when steps are queued ahead).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Must precede the first use of JAX: it fixes how many CPU devices the process has.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from toyjax import sharding, train  # noqa: E402
from toyjax.config import Config, MeshConfig, ModelConfig, MoEConfig, TrainConfig  # noqa: E402
from toyjax.models.decoder import Decoder, init_params  # noqa: E402


def make_config(args) -> Config:
    model = ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=2, n_heads=4, d_ff=4 * args.d_model,
                        max_len=args.length, ffn="moe" if args.moe else "dense",
                        moe=MoEConfig(n_experts=8, dispatch="einsum"))
    return Config(model=model, train=TrainConfig(batch_size=args.batch, steps=10_000, warmup_steps=10))


class Runner:
    """One device count: the jitted step on a mesh over the first n devices; run(k) does k waited-on steps."""

    def __init__(self, cfg: Config, n_devices: int, axis: str, batches: list[dict]):
        cfg = Config(model=cfg.model, train=cfg.train,
                     mesh=MeshConfig(**{"data": 1, axis: -1}) if axis != "data" else MeshConfig())
        model, tx = Decoder(cfg.model), train.make_optimizer(cfg.train)
        self.layout = train.run_layout(model, cfg, tx, train.run_mesh(cfg, jax.devices()[:n_devices]))
        self.step = sharding.jit_train_step(train.make_train_step(model, cfg, tx), self.layout)
        self.params, self.opt_state = sharding.init_state(lambda: init_params(model, cfg.train.seed), tx, self.layout)
        self.batches = [sharding.global_batch(self.layout, b, cfg.train.batch_size) for b in batches]
        self.count = 0

    def run(self, k: int) -> None:
        for _ in range(k):
            i = self.count % len(self.batches)
            self.params, self.opt_state, metrics = self.step(self.params, self.opt_state, self.batches[i],
                                                             train.step_key(0, self.count))
            jax.block_until_ready((self.params, metrics))
            self.count += 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--mesh", choices=("data", "fsdp", "expert"), default="data", help="the axis the devices form")
    parser.add_argument("--moe", action="store_true", help="MoE feed-forward (8 experts) instead of dense")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per device count")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="4 steps in 2 rounds, a smaller model")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.d_model, args.length, args.batch = 4, 2, 64, 32, 16
    if args.mesh == "expert" and not args.moe:
        parser.error("--mesh expert needs --moe")
    counts = [int(c) for c in args.devices.split(",")]
    if max(counts) > jax.device_count():
        parser.error(f"asked for {max(counts)} devices, this process has {jax.device_count()}")
    cfg = make_config(args)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, cfg.model.vocab_size, (args.batch, args.length + 1), dtype=np.int32) for _ in range(4)]
    batches = [{"inputs": w[:, :-1], "targets": w[:, 1:]} for w in windows]
    tokens_per_step = args.batch * args.length
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} cores; "
          f"{'MoE' if args.moe else 'dense'} d_model {args.d_model}, batch {args.batch} x {args.length} tokens; "
          f"devices form the '{args.mesh}' axis")
    runners = {}
    for n in counts:
        start = time.perf_counter()
        runners[n] = Runner(cfg, n, args.mesh, batches)
        runners[n].run(2)
        print(f"  {n} device(s): warm-up {time.perf_counter() - start:.1f} s (2 steps incl. compile)")
    per_round = max(1, args.steps // args.rounds)
    seconds = {n: [] for n in counts}
    for r in range(args.rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:
            start = time.perf_counter()
            runners[n].run(per_round)
            seconds[n].append((time.perf_counter() - start) / per_round)
    base = statistics.median(seconds[counts[0]])
    print(f"\n  {'devices':>7s} {'median ms/step':>15s} {'best ms/step':>13s} {'tokens/s':>9s} "
          f"{'time vs ' + str(counts[0]):>10s}   ({args.rounds} rounds of {per_round} steps)")
    for n in counts:
        median = statistics.median(seconds[n])
        print(f"  {n:7d} {median * 1e3:15.1f} {min(seconds[n]) * 1e3:13.1f} {tokens_per_step / median:9.0f} "
              f"{median / base:9.2f}x")
    print("(simulated devices share the CPU: the ratio is the mesh's overhead, not a speed-up; "
          "measured on a shared machine)")


if __name__ == "__main__":
    main()
