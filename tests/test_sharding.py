"""Training on a device mesh equals training on one device; sharded checkpoints restore on other device counts.

Several devices are simulated in subprocesses (tests/sharding_worker.py, XLA_FLAGS=...device_count=N), since this
pytest process has already started JAX with one; the one-device references run here, on the plain jitted step.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from toyjax import load_run, sharding, train
from toyjax.checkpoints import Checkpoints
from toyjax.config import ConfigError, MeshConfig
from toyjax.models.decoder import Decoder, init_params
from toyjax.testing import tiny_config

import sharding_worker as worker  # next to this file (pytest puts tests/ on the path, as for any test module)

ROOT = Path(__file__).resolve().parents[1]


def run_worker(*args, devices: int, timeout: int = 300, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", **(extra_env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"worker timed out:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """Runs the 8-device worker once: a dense train.run on a data x FSDP mesh, MoE steps on an expert mesh."""
    out = tmp_path_factory.mktemp("eight")
    finish(run_worker("tests/sharding_worker.py", "eight", str(out), devices=8))
    return out, dict(np.load(out / "eight.npz"))


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory):
    """The same dense run as the workers', trained here on one device by the unchanged plain-jit path."""
    workdir = tmp_path_factory.mktemp("dense1")
    with jax.default_device(jax.devices("cpu")[0]):  # the workers' platform, also where a GPU is present
        train.run(worker.dense_config(), workdir, quiet=True)
    return workdir


def train_losses(workdir: Path) -> np.ndarray:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in records if r["split"] == "train"])


def assert_trees_close(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def assert_same_training(got: dict, want: dict) -> None:
    """Asserts two flat parameter dicts after the same steps agree to float rounding (reductions in another order).

    Except the attention key bias: softmax ignores a shift shared by every key, so its true gradient is 0, and Adam
    (which divides by the gradient's size) turns rounding noise of ~1e-10 into steps up to ~lr/10. It must only
    stay within such steps of the other.
    """
    got, want = dict(got), dict(want)
    for name in [n for n in want if n.endswith("attention/qkv/bias")]:
        np.testing.assert_allclose(got[name][1], want[name][1], atol=1e-3, err_msg=f"{name} (key part)")
        got[name], want[name] = np.delete(got[name], 1, axis=0), np.delete(want[name], 1, axis=0)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def subtree(flat: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


# -- 8 devices against 1 -----------------------------------------------------------------------------------------


def test_dense_run_on_a_data_and_fsdp_mesh_equals_one_device(eight, dense_reference):
    out, _ = eight
    np.testing.assert_allclose(train_losses(out / "dense8"), train_losses(dense_reference), rtol=1e-5)
    assert len(train_losses(dense_reference)) == worker.STEPS
    # load_run restores the mesh-trained run onto this process's single device.
    on_mesh, here = load_run(out / "dense8"), load_run(dense_reference)
    assert on_mesh.step == here.step == worker.STEPS
    assert_same_training(worker.flat(on_mesh.params, ""), worker.flat(here.params, ""))


def test_moe_with_expert_parallelism_equals_one_device(eight):
    _, results = eight
    np.testing.assert_allclose(results["moe_losses"], results["moe_reference_losses"], rtol=1e-5)
    assert_same_training(subtree(results, "params/"), subtree(results, "reference/"))
    # Training moved the parameters: the comparison above is not of two copies of the initial values.
    initial = worker.flat(_moe_initial_params(), "")
    moved = subtree(results, "params/")
    assert max(np.abs(moved[k] - initial[k]).max() for k in initial) > 1e-3


def _moe_initial_params():
    cfg = worker.moe_config()
    cfg.model.vocab_size = 120
    return init(cfg)


def test_fsdp_and_expert_shards_really_split_the_weights(eight):
    _, results = eight
    shards = subtree(results, "shards/")  # [devices, ndim] shard shapes; mesh data=1, fsdp=2, expert=4
    params = subtree(results, "params/")
    d_model, n_experts = 32, 4
    expected = {  # each device holds 1/fsdp of d_model and 1/expert of the experts
        "block_0/ffn/w_up": (n_experts // 4, d_model // 2, 64),
        "block_0/ffn/w_down": (n_experts // 4, 64, d_model // 2),
        "embed/embedding": (120, d_model // 2),
        "block_0/attention/qkv/kernel": (d_model // 2, 3, 2, 16),
        "block_0/ln_ffn/scale": (d_model // 2,),
        "block_0/ffn/router": (d_model // 2, n_experts),
    }
    for name, shape in expected.items():
        assert shards[name].shape[0] == 8 and {tuple(s) for s in shards[name]} == {shape}, (name, shards[name])
        ways = 8 if "ffn/w_" in name else 2  # expert weights: experts x d_model; the rest: d_model only
        assert np.prod(shape) == params[name].size // ways, name
    assert {tuple(s) for s in shards["block_0/attention/qkv/bias"]} == {(3, 2, 16)}  # no d_model axis: replicated


# -- checkpoints across device counts ----------------------------------------------------------------------------


def test_saved_on_8_restores_on_1_and_on_2_exactly(eight):
    out, results = eight
    saved_params, saved_opt = subtree(results, "params/"), subtree(results, "opt_state/")
    # On 1 device (this process).
    cfg = worker.moe_config()
    cfg.model.vocab_size = 120
    params_shape = jax.eval_shape(lambda: init_params(Decoder(cfg.model), cfg.train.seed))
    opt_shape = jax.eval_shape(train.make_optimizer(cfg.train).init, params_shape)
    step, params, opt_state, _ = Checkpoints(out / "moe8", read_only=True).restore(
        params_like=params_shape, opt_state_like=opt_shape)
    assert step == worker.STEPS
    assert_trees_close(worker.flat(params, ""), saved_params, rtol=0, atol=0)
    assert_trees_close(worker.flat(opt_state, ""), saved_opt, rtol=0, atol=0)
    # On 2 devices, experts split in two.
    finish(run_worker("tests/sharding_worker.py", "two", str(out), devices=2))
    two = dict(np.load(out / "two.npz"))
    assert_trees_close(subtree(two, "params/"), saved_params, rtol=0, atol=0)
    assert_trees_close(subtree(two, "opt_state/"), saved_opt, rtol=0, atol=0)
    assert {tuple(s) for s in two["shards/block_0/ffn/w_up"]} == {(2, 32, 64)}


# -- two processes -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_with_two_devices_each_match_one_process(tmp_path, dense_reference):
    config_file = tmp_path / "dense.py"
    config_file.write_text('"""The sharding worker\'s dense run."""\nimport sharding_worker\n\n\n'
                           "def get_config():\n    return sharding_worker.dense_config()\n")
    workdir, port = tmp_path / "run", free_port()
    processes = [run_worker("launch.py", "train", "--config", str(config_file), "--workdir", str(workdir), "--quiet",
                            "--config.mesh.fsdp=2", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                            "--process-id", str(rank), devices=2,
                            extra_env={"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}) for rank in (0, 1)]
    for process in processes:
        finish(process)
    # Process 0 alone wrote the metrics: one record per step, as on one process.
    np.testing.assert_allclose(train_losses(workdir), train_losses(dense_reference), rtol=1e-5)
    assert_same_training(worker.flat(load_run(workdir).params, ""), worker.flat(load_run(dense_reference).params, ""))


# -- one device: remat, bfloat16, the tables -----------------------------------------------------------------------


def loss_and_grads(cfg, params, batch):
    model = Decoder(cfg.model)
    loss_fn = train.make_loss_fn(model, cfg)
    rngs = {"dropout": jax.random.key(1), "noise": jax.random.key(2)}
    return jax.jit(jax.grad(loss_fn, has_aux=True))(params, batch, rngs)


def moe_model(**model):
    """Returns a tiny one-layer MoE config (it holds attention, the float32 router and the experts)."""
    return tiny_config(model={"n_layers": 1, "ffn": "moe", "moe.n_experts": 4, "moe.dispatch": "einsum",
                              "vocab_size": 120, **model},
                       train={"learning_rate": 3e-2, "warmup_steps": 1, "batch_size": 8, "steps": 12})


def init(cfg):
    return jax.jit(lambda: init_params(Decoder(cfg.model), cfg.train.seed))()


def test_remat_gives_the_same_loss_and_gradients():
    # Dropout and router noise on: the rematerialised blocks must redraw the same random numbers.
    cfg, remat = moe_model(dropout=0.1), moe_model(dropout=0.1, remat=True)
    batch = worker.synthetic_batches(cfg, 1)[0]
    params = init(cfg)
    grads, metrics = loss_and_grads(cfg, params, batch)
    remat_grads, remat_metrics = loss_and_grads(remat, params, batch)
    np.testing.assert_allclose(remat_metrics["loss"], metrics["loss"], rtol=1e-6)
    assert_trees_close(worker.flat(remat_grads, ""), worker.flat(grads, ""), rtol=1e-5, atol=1e-7)
    # The rematted model really recomputes: its gradient program holds a checkpoint (remat) primitive.
    loss_fn = train.make_loss_fn(Decoder(remat.model), remat)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, batch, {"dropout": jax.random.key(1),
                                                                      "noise": jax.random.key(2)})[0]))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


def copy_task_batches(count: int, vocab: int = 120, batch: int = 8, length: int = 16) -> list[dict]:
    """Returns batches of a learnable sequence (each token is the previous + 1): the loss falls within steps."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        start = rng.integers(0, vocab, (batch, 1))
        windows = ((start + np.arange(length + 1)) % vocab).astype(np.int32)
        out.append({"inputs": windows[:, :-1], "targets": windows[:, 1:]})
    return out


def test_bfloat16_training_tracks_float32_with_float32_state():
    steps = 12  # = train.steps of moe_model
    batches = copy_task_batches(steps)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = moe_model(dtype=dtype)
        model, tx = Decoder(cfg.model), train.make_optimizer(cfg.train)
        step = jax.jit(train.make_train_step(model, cfg, tx))
        params = init(cfg)
        opt_state = tx.init(params)
        losses[dtype] = []
        for i, batch in enumerate(batches):
            params, opt_state, metrics = step(params, opt_state, batch, train.step_key(0, i))
            losses[dtype].append(float(metrics["loss"]))
        # Parameters and optimizer state stay float32; only the compute is bfloat16.
        assert {x.dtype for x in jax.tree.leaves((params, opt_state)) if x.ndim} == {np.dtype("float32")}
        if dtype == "bfloat16":
            jaxpr = str(jax.make_jaxpr(step)(params, opt_state, batches[0], train.step_key(0, 0)))
            assert "bf16" in jaxpr
    f32, bf16 = np.array(losses["float32"]), np.array(losses["bfloat16"])
    assert f32[-1] < 0.8 * f32[0]  # it learned, so tracking is not two flat lines
    np.testing.assert_allclose(bf16, f32, rtol=0.02)


@pytest.mark.parametrize("model", [
    {}, {"ffn": "moe", "moe.n_experts": 4}, {"ffn": "moe", "moe.router": "switch", "moe.n_experts": 4},
    {"attention": "topk", "positions": "rotary", "tie_embeddings": False},
])
def test_every_parameter_has_logical_axes(model):
    cfg = tiny_config(model={"vocab_size": 120, **model})
    params = jax.eval_shape(lambda: init_params(Decoder(cfg.model), cfg.train.seed))
    assert sharding.unmatched_params(params) == []
    axes = jax.tree.leaves(sharding.param_logical_axes(params),
                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    leaves = jax.tree.leaves(params)
    assert [len(spec) for spec in axes] == [leaf.ndim for leaf in leaves]
    # FSDP reaches every parameter with a d_model axis (32 wide; no other size here is 32).
    for spec, leaf in zip(axes, leaves):
        if cfg.model.d_model in leaf.shape:
            assert spec[leaf.shape.index(cfg.model.d_model)] == "embed", (spec, leaf.shape)


def test_mesh_sizes_resolve_and_bad_ones_are_named():
    assert sharding.mesh_shape(MeshConfig(), 8) == {"data": 8, "fsdp": 1, "expert": 1}
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, expert=2), 8) == {"data": 2, "fsdp": 2, "expert": 2}
    with pytest.raises(ConfigError, match="needs 4 devices but 8 are available"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(ConfigError, match="cannot be split into groups of 3"):
        sharding.mesh_shape(MeshConfig(fsdp=3), 8)
    cases = {
        "mesh.data=0 must be >= 1, or -1": {"mesh": {"data": 0}},
        "only one mesh axis may be -1": {"mesh": {"fsdp": -1}},
        "mesh.fsdp=3 must divide model.d_model=32": {"mesh": {"data": 1, "fsdp": 3}},
        "mesh.expert=2 splits MoE experts but model.ffn='dense'": {"mesh": {"expert": 2}},
        "mesh.expert=3 must divide model.moe.n_experts=8": {"model": {"ffn": "moe"}, "mesh": {"expert": 3}},
        "train.batch_size=4 must be divisible by mesh.data x mesh.fsdp x mesh.expert = 8": {"mesh": {"data": 8}},
    }
    for message, sections in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            tiny_config(**sections)


def test_a_mesh_bigger_than_the_devices_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    import launch

    workdir = tmp_path / "run"
    status = launch.main(["train", "--config", str(launch.QUICKSTART), "--workdir", str(workdir),
                          "--config.mesh.data=2", "--config.train.batch_size=8"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err.startswith("error: ") and "\n" not in err
    assert "mesh.data=2" in err and "needs 2 devices but 1 are available" in err
    assert not workdir.exists()
