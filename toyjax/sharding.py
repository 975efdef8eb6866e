"""Training on a device mesh: where parameters, optimizer state and batches live, and multi-process start-up.

The mesh has three axes, sized by the config's `mesh` section (-1 = the devices the other axes leave):

    data    splits the batch only
    fsdp    splits the batch, and every parameter and optimizer-state array along its `embed` (d_model) axis
    expert  splits the batch, and MoE expert weights along their leading expert axis (XLA adds the all-to-all)

Parameters get logical axis names from PARAM_AXES, a table keyed by parameter path (the model code carries no
sharding annotations, so it stays a plain linen model), and AXIS_RULES maps logical names to mesh axes through
Flax's own `logical_to_mesh_sharding`: the two tables are the one place to change how anything is split.
The jitted steps get these shardings as in/out shardings; with one device there is no mesh at all (`make_layout`
returns None) and training is the plain jitted step of before.

Multi-process (one process per host, or several on one machine): every process runs the same command, and each
loads only its own rows of every global batch (still a function of (seed, step)); process 0 writes the metrics,
samples and plot. Two processes on one machine, two CPU devices each:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python launch.py train --config CONFIG --workdir DIR \\
        --coordinator localhost:12355 --num-processes 2 --process-id 0 &
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python launch.py train --config CONFIG --workdir DIR \\
        --coordinator localhost:12355 --num-processes 2 --process-id 1

The flags default to the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
Without them (or with one process) nothing is initialised and the run uses this process's devices.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from toyjax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert")

# Logical axes of each parameter, by a regular expression on its path ("block_0/attention/qkv/kernel").
# A parameter that matches nothing is replicated (see unmatched_params, which the tests keep empty).
PARAM_AXES = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"(^|/)(position|grammar_feature_\d+)/embedding$", (None, "embed")),
    (r"attention/qkv/kernel$", ("embed", None, "heads", "head_dim")),  # [d_model, q/k/v, heads, head_dim]
    (r"attention/qkv/bias$", (None, "heads", "head_dim")),
    (r"attention/out/kernel$", ("heads", "head_dim", "embed")),
    (r"ffn/up/kernel$", ("embed", "mlp")),
    (r"ffn/up/bias$", ("mlp",)),
    (r"ffn/down/kernel$", ("mlp", "embed")),
    (r"ffn/router(_noise)?$", ("embed", None)),  # [d_model, experts]: every device routes its own tokens
    (r"ffn/w_up$", ("expert", "embed", "mlp")),  # [experts, d_model, d_ff]
    (r"ffn/b_up$", ("expert", "mlp")),
    (r"ffn/w_down$", ("expert", "mlp", "embed")),
    (r"ffn/b_down$", ("expert", "embed")),
    (r"(attention/out|ffn/down|ln_\w+)/(bias|scale)$", ("embed",)),
    (r"(^|/)unembed/kernel$", ("embed", "vocab")),
    (r"(^|/)unembed/bias$", ("vocab",)),
)

# Logical axis -> mesh axes, in Flax's rule format (first matching rule wins; a mesh axis is used once per array).
AXIS_RULES = (
    ("batch", MESH_AXES),
    ("expert", "expert"),
    ("embed", "fsdp"),
)


# -- the mesh ------------------------------------------------------------------------------------------------------


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Returns {axis: size} with -1 resolved to the devices left over; a ConfigError if the sizes cannot fit."""
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    described = " x ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
    if -1 in sizes.values():
        if n_devices % fixed:
            raise ConfigError(f"{described}: {n_devices} devices cannot be split into groups of {fixed}; "
                              "choose sizes whose product divides the device count")
        sizes = {axis: n_devices // fixed if size == -1 else size for axis, size in sizes.items()}
    elif fixed != n_devices:
        raise ConfigError(f"{described} needs {fixed} devices but {n_devices} are available; "
                          "set one of them to -1 to use the rest")
    return sizes


def build_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """Returns a Mesh over `devices` (default: every device of every process) shaped by the mesh config."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(mesh_shape(cfg, len(devices)).values())
    # create_device_mesh orders accelerators by their interconnect; on CPU it is a plain reshape, so each
    # process's devices stay contiguous and a process's batch rows are one block.
    return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), MESH_AXES)


def check_divisible(mesh: Mesh, *, batch_size: int, d_model: int, n_experts: int | None) -> None:
    """Raises ConfigError if the batch, d_model or the experts do not split evenly over the mesh."""
    shape = dict(mesh.shape)
    batch_ways = math.prod(shape.values())
    problems = []
    if batch_size % batch_ways:
        problems.append(f"train.batch_size={batch_size} must be divisible by the {batch_ways} devices it is split "
                        f"over (mesh {shape})")
    if d_model % shape["fsdp"]:
        problems.append(f"model.d_model={d_model} must be divisible by mesh.fsdp={shape['fsdp']}")
    if n_experts is not None and n_experts % shape["expert"]:
        problems.append(f"model.moe.n_experts={n_experts} must be divisible by mesh.expert={shape['expert']}")
    if problems:
        raise ConfigError("; ".join(problems))


# -- shardings -----------------------------------------------------------------------------------------------------


def param_path(key_path) -> str:
    """Returns a parameter's path as 'block_0/attention/qkv/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def logical_axes_of(path: str, ndim: int) -> PartitionSpec:
    """Returns the logical PartitionSpec of the parameter at `path` (all None when no PARAM_AXES row matches)."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"parameter {path} has {ndim} dimensions but toyjax.sharding.PARAM_AXES names "
                                 f"{len(axes)} ({axes}); update the table for the new shape")
            return PartitionSpec(*axes)
    return PartitionSpec(*([None] * ndim))


def param_logical_axes(params) -> Any:
    """Returns a tree like params of logical PartitionSpecs (e.g. P('expert', 'embed', 'mlp'))."""
    return jax.tree_util.tree_map_with_path(lambda k, p: logical_axes_of(param_path(k), len(p.shape)), params)


def unmatched_params(params) -> list[str]:
    """Returns the paths of parameters no PARAM_AXES row names (they would be replicated on every device)."""
    paths = [param_path(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [p for p in paths if not any(re.search(pattern, p) for pattern, _ in PARAM_AXES)]


def param_shardings(params, mesh: Mesh) -> Any:
    """Returns a tree like params of NamedShardings: PARAM_AXES mapped to the mesh by AXIS_RULES."""
    return nn.logical_to_mesh_sharding(param_logical_axes(params), mesh, AXIS_RULES)


def opt_state_shardings(opt_state, params, shardings_of_params, mesh: Mesh) -> Any:
    """Returns a tree like opt_state of shardings: a leaf that mirrors a parameter (Adam's mu, nu) is split like it.

    A leaf mirrors a parameter when the trailing dict keys of its path are that parameter's path and the
    shapes agree; anything else (step counts) is replicated.
    """
    by_path = {tuple(k.key for k in path): (p.shape, s) for (path, p), s in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings_of_params))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(key_path, leaf):
        trailing = []
        for key in reversed(key_path):
            if not isinstance(key, jax.tree_util.DictKey):
                break
            trailing.insert(0, key.key)
        shape, sharding = by_path.get(tuple(trailing), (None, replicated))
        return sharding if shape == tuple(leaf.shape) else replicated

    return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


class Layout(NamedTuple):
    """Where a training run's arrays live on a mesh of more than one device."""

    mesh: Mesh
    params: Any  # tree of NamedSharding, like the params
    opt_state: Any  # tree of NamedSharding, like the optimizer state
    batch: NamedSharding  # rows split over every mesh axis
    replicated: NamedSharding
    # Collectives of several simulated CPU devices share a few cores: steps queued ahead can deadlock there.
    wait_each_step: bool


def make_layout(mesh: Mesh, params_shape, opt_state_shape) -> Layout | None:
    """Returns the Layout of a run on `mesh` (shapes from jax.eval_shape), or None for a one-device mesh."""
    if mesh.size == 1:
        return None
    shardings = param_shardings(params_shape, mesh)
    batch_spec = nn.logical_to_mesh_axes(("batch",), AXIS_RULES)
    return Layout(mesh, shardings, opt_state_shardings(opt_state_shape, params_shape, shardings, mesh),
                  NamedSharding(mesh, batch_spec), NamedSharding(mesh, PartitionSpec()),
                  wait_each_step=mesh.devices.flat[0].platform == "cpu")


def jit_train_step(train_step: Callable, layout: Layout | None) -> Callable:
    """Returns train_step jitted (params and optimizer state donated), with the layout's shardings if any."""
    if layout is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    return jax.jit(train_step, donate_argnums=(0, 1),
                   in_shardings=(layout.params, layout.opt_state, layout.batch, layout.replicated),
                   out_shardings=(layout.params, layout.opt_state, layout.replicated))


def jit_eval_step(eval_step: Callable, layout: Layout | None) -> Callable:
    """Returns eval_step jitted; on a mesh the params keep their shardings and the sums come back replicated."""
    if layout is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, in_shardings=(layout.params, None), out_shardings=layout.replicated)


def init_state(init_params: Callable[[], Any], tx, layout: Layout | None):
    """Returns (params, opt_state), created directly in their shardings (no device holds a full copy first)."""
    if layout is None:
        params = init_params()
        return params, tx.init(params)
    params = jax.jit(init_params, out_shardings=layout.params)()
    return params, jax.jit(tx.init, in_shardings=(layout.params,), out_shardings=layout.opt_state)(params)


# -- batches -------------------------------------------------------------------------------------------------------


def process_rows(layout: Layout | None, batch_size: int) -> slice:
    """Returns the rows of each global batch this process loads (all of them without a mesh or on one process)."""
    if layout is None or jax.process_count() == 1:
        return slice(0, batch_size)
    indices = layout.batch.addressable_devices_indices_map((batch_size,)).values()
    blocks = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop) for i in indices})
    start, stop = blocks[0][0], blocks[-1][1]
    if sum(b - a for a, b in blocks) != stop - start:  # not one block: load everything, keep what is ours
        return slice(0, batch_size)
    return slice(start, stop)


def global_batch(layout: Layout | None, local_batch: dict, batch_size: int) -> dict:
    """Returns the batch as the step takes it: numpy as given without a mesh, else global arrays split by rows.

    local_batch: this process's rows (process_rows) of a global batch of batch_size rows.
    """
    if layout is None:
        return local_batch
    return {name: jax.make_array_from_process_local_data(layout.batch, rows, (batch_size, *rows.shape[1:]))
            for name, rows in local_batch.items()}


def eval_batch(layout: Layout | None, batch: dict) -> dict:
    """Returns a whole evaluation batch (the same on every process) placed for eval_step.

    Rows split over the mesh when they divide evenly; a short last batch is replicated instead (same sums).
    """
    if layout is None:
        return batch
    rows = len(next(iter(batch.values())))
    sharding = layout.batch if rows % layout.mesh.size == 0 else layout.replicated
    return {name: jax.make_array_from_process_local_data(sharding, value, value.shape) for name, value in batch.items()}


# -- processes -----------------------------------------------------------------------------------------------------


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts jax.distributed when a coordinator or more than one process is named; a ConfigError if incomplete.

    Each argument left None is read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES or JAX_PROCESS_ID.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
    if not coordinator and (num_processes or 1) == 1:
        return
    if not coordinator or num_processes is None or process_id is None:
        raise ConfigError("multi-process training needs all of --coordinator HOST:PORT, --num-processes N and "
                          f"--process-id I (got {coordinator!r}, {num_processes!r}, {process_id!r})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id={process_id} must be in [0, --num-processes={num_processes})")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer") from None


def is_primary() -> bool:
    """Returns whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def primary_first(fn: Callable[[], Any]) -> Any:
    """Returns fn() on every process; process 0 runs it before the others, so what it writes they can read."""
    if jax.process_count() == 1:
        return fn()
    if is_primary():
        result = fn()
        multihost_utils.sync_global_devices("toyjax: process 0 prepared the workdir")
        return result
    multihost_utils.sync_global_devices("toyjax: process 0 prepared the workdir")
    return fn()


def host_copy(tree) -> Any:
    """Returns tree with every array whole on this host (an all-gather across processes when there are several)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)
