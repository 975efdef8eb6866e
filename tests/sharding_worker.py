"""The parts of tests/test_sharding.py that need several devices, run in a fresh process.

    PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py eight OUT_DIR
    PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/sharding_worker.py two OUT_DIR

(the pytest process has already started JAX with one device). Results go to OUT_DIR as .npz files; the test
process compares them with its own one-device runs. Every step is waited on: collectives of 8 simulated devices
on 2 cores can deadlock when steps are queued ahead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from toyjax import sharding, train
from toyjax.checkpoints import Checkpoints
from toyjax.models.decoder import Decoder, init_params
from toyjax.testing import tiny_config

STEPS = 4


def dense_config(**mesh):
    """Returns the tiny dense run both sides train (train.run): per-step losses land in metrics.jsonl."""
    return tiny_config(model={"n_layers": 1}, mesh=mesh,
                       train={"steps": STEPS, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "eval_every": STEPS,
                              "checkpoint_every": STEPS, "eval_batches": 1, "n_samples": 0})


def moe_config(**mesh):
    return tiny_config(model={"n_layers": 1, "ffn": "moe", "moe.n_experts": 4, "moe.top_k": 2, "moe.dispatch": "einsum"},
                       mesh=mesh,
                       train={"batch_size": 8, "warmup_steps": 1})


def synthetic_batches(cfg, count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 120, (cfg.train.batch_size, cfg.model.max_len + 1), dtype=np.int32)
               for _ in range(count)]
    return [{"inputs": w[:, :-1], "targets": w[:, 1:]} for w in windows]


def train_steps(cfg, devices, batches):
    """Returns (losses, params, opt_state) after len(batches) steps of the jitted step on a mesh over `devices`."""
    cfg.model.vocab_size = 120
    model = Decoder(cfg.model)
    tx = train.make_optimizer(cfg.train)
    layout = train.run_layout(model, cfg, tx, train.run_mesh(cfg, devices))
    step = sharding.jit_train_step(train.make_train_step(model, cfg, tx), layout)
    if layout is None:  # the plain one-device step; init jitted as on a mesh (eager init: seconds of op compiles)
        params = jax.jit(lambda: init_params(model, cfg.train.seed))()
        opt_state = tx.init(params)
    else:
        params, opt_state = sharding.init_state(lambda: init_params(model, cfg.train.seed), tx, layout)
    losses = []
    for i, batch in enumerate(batches):
        batch = sharding.global_batch(layout, batch, cfg.train.batch_size)
        params, opt_state, metrics = step(params, opt_state, batch, train.step_key(cfg.train.seed, i))
        jax.block_until_ready((params, opt_state, metrics))
        losses.append(float(metrics["loss"]))
    return np.array(losses), params, opt_state


def flat(tree, prefix: str) -> dict:
    """Returns {prefix + path: numpy array} for every leaf (npz-friendly)."""
    return {prefix + sharding.param_path(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shard_shapes(tree, prefix: str) -> dict:
    """Returns {prefix + path: [shape of each addressable shard]} (one row per device)."""
    return {prefix + sharding.param_path(k): np.array([s.data.shape for s in v.addressable_shards])
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def eight(out: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    # Dense through the real loop on a data x FSDP mesh; the test compares it with train.run on one device.
    train.run(dense_config(data=4, fsdp=2), out / "dense8", quiet=True)
    # MoE with expert parallelism (and FSDP), against the plain one-device step in this same process.
    batches = synthetic_batches(moe_config(), STEPS)
    reference_losses, reference, _ = train_steps(moe_config(), jax.devices()[:1], batches)
    losses, params, opt_state = train_steps(moe_config(fsdp=2, expert=4), jax.devices(), batches)
    Checkpoints(out / "moe8").save(STEPS, params, opt_state, {})
    np.savez(out / "eight.npz", moe_losses=losses, moe_reference_losses=reference_losses,
             **flat(params, "params/"), **flat(reference, "reference/"), **flat(opt_state, "opt_state/"),
             **shard_shapes(params, "shards/"))


def two(out: Path) -> None:
    assert jax.device_count() == 2, jax.devices()
    cfg = moe_config(expert=2)
    cfg.model.vocab_size = 120
    model = Decoder(cfg.model)
    tx = train.make_optimizer(cfg.train)
    layout = train.run_layout(model, cfg, tx, train.run_mesh(cfg))

    def target(shapes, shardings):
        return jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, shardings)

    params_shape = jax.eval_shape(lambda: init_params(model, cfg.train.seed))
    opt_state_shape = jax.eval_shape(tx.init, params_shape)
    step, params, opt_state, _ = Checkpoints(out / "moe8", read_only=True).restore(
        params_like=target(params_shape, layout.params), opt_state_like=target(opt_state_shape, layout.opt_state))
    np.savez(out / "two.npz", **flat(params, "params/"), **flat(opt_state, "opt_state/"),
             **shard_shapes(params, "shards/"))


if __name__ == "__main__":
    {"eight": eight, "two": two}[sys.argv[1]](Path(sys.argv[2]))
