"""Training: a pure, jitted train step (AdamW, warm-up + cosine, clipping) and a loop that resumes from its workdir.

The step is `train_step(params, opt_state, batch, key) -> (params, opt_state, metrics)`: arrays in, arrays out,
no Python state, so a device mesh wraps it unchanged (jax.jit with in/out shardings, see toyjax.sharding). Batches
depend only on (train.seed, step) and the step's randomness on fold_in(seed, step), so a resumed run repeats the
uninterrupted one, on any number of devices or processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from toyjax import report, runs, sharding
from toyjax.checkpoints import Checkpoints
from toyjax.config import Config, TrainConfig
from toyjax.data.run_data import scored_batches
from toyjax.metrics import MetricsWriter, NullMetricsWriter
from toyjax.models.decoder import Decoder, init_params


# Checkpoint meta key: the train metrics of the steps since the last log (a log averages its interval's steps).
UNLOGGED_METRICS = "train_metrics_since_last_log"


class NonFiniteLossError(FloatingPointError):
    """The loss or gradients became NaN or inf; the run stopped before saving anything non-finite."""


# -- losses and the step ------------------------------------------------------------------------------------


def cross_entropy(logits, targets, valid_mask=None):
    """Returns per-token negative log-likelihood [batch, length]; with valid_mask only valid tokens compete."""
    if valid_mask is not None:
        from toyjax.grammar import masked_cross_entropy

        return masked_cross_entropy(logits, targets, valid_mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def first_max_index(logits):
    """Returns argmax(logits, -1) (the first index on ties), as a max then an int min instead of argmax's
    (value, index) reduce, which XLA:CPU does not vectorise: half the loss's time at vocab 4096."""
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits == row_max, jnp.arange(logits.shape[-1]), logits.shape[-1]), axis=-1)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg)
    # Decay matrices only: biases, LayerNorm scales and (1-D) gains keep their values.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    # grad_clip <= 0 disables clipping but keeps the same optimizer-state structure, so runs stay resumable.
    clip = optax.clip_by_global_norm(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    return optax.chain(clip, optax.adamw(schedule, b1=0.9, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask))


def model_inputs(batch, grammar):
    """Returns (valid_mask, state_features) for a batch: both None without grammar tables."""
    if grammar is None or "grammar_state" not in batch:
        return None, None
    state = batch["grammar_state"]
    return grammar.valid[state], grammar.features[state]


def make_loss_fn(model: Decoder, cfg: Config, grammar=None) -> Callable:
    """Returns loss_fn(params, batch, rngs) -> (loss, metrics) for training (dropout and router noise on)."""
    use_valid_subset = cfg.train.loss == "valid_subset"
    if cfg.train.loss not in ("full", "valid_subset"):
        raise ValueError(f"train.loss must be 'full' or 'valid_subset', got {cfg.train.loss!r}")
    if use_valid_subset and grammar is None:
        raise ValueError("train.loss='valid_subset' needs a grammar (data.source 'structured' or 'mixed')")

    def loss_fn(params, batch, rngs):
        valid_mask, features = model_inputs(batch, grammar)
        logits, side = model.apply({"params": params}, batch["inputs"], state_features=features,
                                   deterministic=False, rngs=rngs, mutable=["aux_loss", "metrics"])
        nll = cross_entropy(logits, batch["targets"], valid_mask if use_valid_subset else None)
        aux = sum(jnp.sum(x) for x in jax.tree.leaves(side.get("aux_loss", {})))
        metrics = {"loss": nll.mean(), "accuracy": (first_max_index(logits) == batch["targets"]).mean(),
                   "aux_loss": jnp.asarray(aux, jnp.float32)}
        metrics.update(_flat_metrics(side.get("metrics", {})))
        return nll.mean() + aux, metrics

    return loss_fn


def _flat_metrics(tree) -> dict:
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[name] = jnp.mean(value)
    return out


def make_train_step(model: Decoder, cfg: Config, tx: optax.GradientTransformation, grammar=None) -> Callable:
    """Returns the pure train step (not yet jitted)."""
    loss_fn = make_loss_fn(model, cfg, grammar)

    def train_step(params, opt_state, batch, key):
        dropout_key, noise_key = jax.random.split(key)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch, {"dropout": dropout_key, "noise": noise_key})
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        return params, opt_state, metrics

    return train_step


def make_eval_step(model: Decoder, cfg: Config, grammar=None) -> Callable:
    """Returns eval_step(params, batch) -> summed nll, correct and token counts (deterministic)."""
    def eval_step(params, batch):
        valid_mask, features = model_inputs(batch, grammar)
        logits = model.apply({"params": params}, batch["inputs"], state_features=features, deterministic=True)
        restrict = valid_mask if cfg.train.loss == "valid_subset" else None
        nll = cross_entropy(logits, batch["targets"], restrict)
        if restrict is not None:
            logits = jnp.where(restrict, logits, -jnp.inf)
        correct = logits.argmax(-1) == batch["targets"]
        return {"nll": nll.sum(), "correct": correct.sum(), "tokens": jnp.asarray(nll.size, jnp.float32)}

    return eval_step


def run_mesh(cfg: Config, devices=None) -> jax.sharding.Mesh:
    """Returns the mesh the config asks for over `devices` (default: all); a ConfigError if the run cannot split."""
    mesh = sharding.build_mesh(cfg.mesh, devices)
    sharding.check_divisible(mesh, batch_size=cfg.train.batch_size, d_model=cfg.model.d_model,
                             n_experts=cfg.model.moe.n_experts if cfg.model.ffn == "moe" else None)
    return mesh


def run_layout(model: Decoder, cfg: Config, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
    """Returns where the run's arrays live on the mesh (None on one device: the plain jitted step)."""
    if mesh.size == 1:
        return None
    params_shape = jax.eval_shape(lambda: init_params(model, cfg.train.seed))
    return sharding.make_layout(mesh, params_shape, jax.eval_shape(tx.init, params_shape))


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def evaluate(eval_step, params, batches) -> dict:
    totals = {"nll": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch in batches:
        out = jax.device_get(eval_step(params, batch))
        totals = {k: totals[k] + float(out[k]) for k in totals}
    loss = totals["nll"] / max(totals["tokens"], 1)
    return {"loss": loss, "ppl": float(np.exp(min(loss, 50))), "accuracy": totals["correct"] / max(totals["tokens"], 1),
            "nll_sum": totals["nll"], "tokens": totals["tokens"]}


# -- the loop -------------------------------------------------------------------------------------------------


def run(cfg: Config, workdir: str | Path, *, quiet: bool = False, until: int | None = None) -> dict:
    """Trains (resuming from workdir if it holds a run) and returns the final validation metrics.

    until: stop (with a checkpoint) after this step, as a pre-empted job would; the next call resumes there.
    """
    workdir = Path(workdir)
    mesh = run_mesh(cfg)  # before anything is written: a mesh that does not fit the devices leaves no workdir
    primary = sharding.is_primary()  # the process that writes files and logs
    quiet = quiet or not primary
    cfg, tokenizer, streams, grammar = sharding.primary_first(
        lambda: runs.prepare(cfg, workdir, quiet=quiet, write=primary))
    model = Decoder(cfg.model)
    tx = make_optimizer(cfg.train)
    layout = run_layout(model, cfg, tx, mesh)
    train_step = sharding.jit_train_step(make_train_step(model, cfg, tx, grammar), layout)
    eval_step = sharding.jit_eval_step(make_eval_step(model, cfg, grammar), layout)
    train_stream, valid_stream = streams
    length, batch_size = cfg.model.max_len, cfg.train.batch_size
    valid_batches = [sharding.eval_batch(layout, b) for b in scored_batches(cfg, valid_stream)]
    my_rows = sharding.process_rows(layout, batch_size)

    params, opt_state = sharding.init_state(lambda: init_params(model, cfg.train.seed), tx, layout)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    start, restored_step, pending = 0, None, []
    if checkpoints.latest_step() is not None:
        start, params, opt_state, meta = checkpoints.restore(params_like=params, opt_state_like=opt_state)
        restored_step, pending = start, meta.get(UNLOGGED_METRICS, [])
        runs.log(f"resuming from step {start} in {workdir}", quiet)
    # Drops records a killed run wrote after `start`.
    metrics = MetricsWriter(workdir, restored_step=restored_step) if primary else NullMetricsWriter()
    last_good = checkpoints.latest_step()
    all_finite = jnp.asarray(True)
    log_since = start - len(pending)
    timed_since, log_time = start, time.perf_counter()
    progress = runs.progress(start, cfg.train.steps, quiet)
    result = {}
    stop = min(cfg.train.steps, until) if until is not None else cfg.train.steps
    try:
        for step in range(start, stop):
            rows = train_stream.batch(step, seed=cfg.train.seed, batch_size=batch_size, length=length, rows=my_rows)
            batch = sharding.global_batch(layout, rows, batch_size)
            params, opt_state, step_metrics = train_step(params, opt_state, batch, step_key(cfg.train.seed, step))
            if layout is not None and layout.wait_each_step:
                jax.block_until_ready(params)
            all_finite = all_finite & step_metrics.pop("finite")
            pending.append(step_metrics)
            done = step + 1
            progress.update(1)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                _check_finite(all_finite, log_since, done, last_good, checkpoints)
                now = time.perf_counter()
                per_step = _per_step(pending)
                record = {k: float(np.mean([m[k] for m in per_step])) for k in per_step[0]}
                record.update(step=done, split="train", lr=float(learning_rate_schedule(cfg.train)(done)),
                              tokens_per_s=(done - timed_since) * batch_size * length / (now - log_time))
                metrics.write(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                pending, log_since, timed_since, log_time = [], done, done, time.perf_counter()
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                result = evaluate(eval_step, params, valid_batches)
                metrics.write({"step": done, "split": "valid", **result})
                log_time = time.perf_counter()  # keep evaluation out of the throughput figure
            if done % cfg.train.checkpoint_every == 0 or done == stop:
                _check_finite(all_finite, log_since, done, last_good, checkpoints)
                # Steps since the last log go with the checkpoint, so a resumed run logs the same averages.
                checkpoints.save(done, params, opt_state, {"config": cfg.to_dict(), UNLOGGED_METRICS: _per_step(pending)})
                last_good = done
    finally:
        progress.close()
        metrics.close()
    if not result:  # nothing left to train: report the restored model
        result = evaluate(eval_step, params, valid_batches)
    result["step"] = max(stop, start)
    if stop < cfg.train.steps:
        return result
    params = sharding.host_copy(params)  # every process takes part; then process 0 samples alone
    if primary:
        result["tokens_per_s"] = runs.mean_throughput(workdir)
        report.finish(cfg, workdir, model, params, tokenizer, grammar, result, quiet=quiet)
    return result


def _per_step(pending: list[dict]) -> list[dict]:
    """Returns each step's metrics as Python floats (JSON for a checkpoint's meta; a mean in float64 either way)."""
    return [{k: float(v) for k, v in jax.device_get(m).items()} for m in pending]


def _check_finite(all_finite, since: int, now: int, last_good, checkpoints: Checkpoints) -> None:
    if bool(jax.device_get(all_finite)):
        return
    where = f"step {last_good} in {checkpoints.directory}" if last_good is not None else "none (no step was saved)"
    raise NonFiniteLossError(
        f"the loss or gradients became NaN/inf between steps {since} and {now}; training stopped without saving. "
        f"Last good checkpoint: {where}. Try a lower train.learning_rate or train.grad_clip > 0.")

