import glob
import json
import os
import shutil
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from toyjax import load_run, train
from toyjax.checkpoints import CheckpointError, Checkpoints
from toyjax.config import ConfigError
from toyjax.testing import tiny_config


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = train.run(tiny_config(), workdir, quiet=True)
    return workdir, result


def test_run_leaves_everything_in_the_workdir(trained):
    workdir, result = trained
    for name in ("config.json", "tokenizer/tokenizer.json", "metrics.jsonl", "samples.txt", "loss.png"):
        assert (workdir / name).is_file(), name
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "valid"] == [4, 8]
    assert result["ppl"] == pytest.approx(np.exp(result["loss"]))
    assert Checkpoints(workdir / "checkpoints").steps() == [4, 8]


def test_loss_falls_below_the_unigram_entropy(tmp_path):
    cfg = tiny_config(train={"steps": 100, "batch_size": 16, "eval_every": 50, "checkpoint_every": 100,
                             "learning_rate": 1e-2})
    train.run(cfg, tmp_path, quiet=True)
    valid = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"valid"' in l]
    # A model that uses context must beat the best context-free model: the unigram entropy of the text.
    from toyjax.data import pipeline
    from toyjax.tokenizers import load_tokenizer

    docs, _ = pipeline.split_train_valid(pipeline.load_documents(cfg.data), cfg.data.valid_fraction)
    tokens = pipeline.TokenStream.encode(load_tokenizer(tmp_path / "tokenizer"), docs).tokens
    p = np.bincount(tokens) / len(tokens)
    unigram_entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert valid[-1]["loss"] < 0.8 * unigram_entropy and valid[-1]["loss"] < valid[0]["loss"]


def test_checkpoint_round_trip_is_bit_exact_and_plain_orbax_reads_params(trained):
    workdir, _ = trained
    run = load_run(workdir)
    assert run.step == 8
    step, params, opt_state, meta = Checkpoints(workdir / "checkpoints").restore(
        params_like=run.params, opt_state_like=train.make_optimizer(run.config.train).init(run.params))
    assert leaves_equal(params, run.params) and meta["step"] == 8
    plain = ocp.StandardCheckpointer().restore((workdir / "checkpoints" / "8" / "params").absolute())
    assert leaves_equal(plain, run.params)
    # Saving and restoring again reproduces every array exactly.
    store = Checkpoints(workdir / "copy")
    store.save(1, params, opt_state, {})
    _, params2, opt_state2, _ = store.restore(params_like=params, opt_state_like=opt_state)
    assert leaves_equal(params2, params) and leaves_equal(opt_state2, opt_state)


def test_interrupted_and_resumed_run_equals_uninterrupted(trained, tmp_path):
    workdir, _ = trained
    cfg = tiny_config()
    train.run(cfg, tmp_path, quiet=True, until=4)
    assert Checkpoints(tmp_path / "checkpoints").steps() == [4]
    train.run(cfg, tmp_path, quiet=True)
    assert leaves_equal(load_run(tmp_path).params, load_run(workdir).params)


def test_corrupted_checkpoint_is_named_and_previous_step_restores(trained, tmp_path):
    workdir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    for path in glob.glob(str(copy / "checkpoints" / "8" / "params" / "**" / "d" / "*"), recursive=True):
        open(path, "wb").write(b"not a checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load_run(copy)
    assert run.step == 4
    assert any("checkpoints/8" in str(w.message) and "corrupted" in str(w.message) for w in caught)
    # A leftover temporary folder from an interrupted save is not mistaken for a step.
    (copy / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()
    assert Checkpoints(copy / "checkpoints").steps() == [4, 8]


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("pattern, damage", [
    ("params/**/d/*", _truncate),  # a write cut short
    ("params/_METADATA", os.remove),  # a file lost
    ("meta/*", lambda path: open(path, "w").write("{not json")),  # a garbled JSON item
])
def test_truncated_or_missing_checkpoint_files_fall_back_to_the_previous_step(trained, tmp_path, pattern, damage):
    workdir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    paths = glob.glob(str(copy / "checkpoints" / "8" / pattern), recursive=True)
    assert paths
    for path in paths:
        damage(path)
    with pytest.warns(UserWarning, match="checkpoints/8 is corrupted"):
        assert load_run(copy).step == 4


def test_a_bug_while_restoring_is_not_taken_for_a_damaged_step(trained, monkeypatch):
    workdir, _ = trained

    def buggy_restore(*args, **kwargs):
        raise TypeError("a programming error")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", buggy_restore)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "corrupted, trying the previous step" warning either
        with pytest.raises(TypeError, match="a programming error"):
            load_run(workdir)


def test_mismatched_checkpoint_and_config_are_clear_errors(trained, tmp_path):
    workdir, _ = trained
    bigger = tiny_config(model={"d_model": 64})
    with pytest.raises(ConfigError, match="(?s)holds a different run.*model.d_model: workdir has 32, config asks 64"):
        train.run(bigger, workdir, quiet=True)
    run = load_run(workdir)
    wrong = jax.tree.map(lambda x: np.zeros(x.shape + (1,)), run.params)
    with pytest.raises(CheckpointError, match="does not match this model"):
        Checkpoints(workdir / "checkpoints").restore(params_like=wrong)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(train={"steps": 8, "checkpoint_every": 2})
    train.run(cfg, tmp_path, quiet=True, until=2)
    exploding = tiny_config(train={"steps": 8, "checkpoint_every": 2, "learning_rate": 1e30,
                                   "grad_clip": 0.0, "warmup_steps": 1})
    with pytest.raises(train.NonFiniteLossError, match=r"NaN/inf.*Last good checkpoint: step 2"):
        train.run(exploding, tmp_path, quiet=True)
    assert Checkpoints(tmp_path / "checkpoints").steps() == [2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_run(tmp_path).params))


def test_valid_subset_loss_needs_a_grammar(tmp_path):
    with pytest.raises(ValueError, match="needs a grammar"):
        train.run(tiny_config(train={"loss": "valid_subset"}), tmp_path, quiet=True)


def test_cross_entropy_matches_float64_reference():
    logits = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
    targets = np.array([[0, 3, 6], [2, 2, 1]])
    mask = np.random.default_rng(1).random((2, 3, 7)) < 0.5
    mask[np.arange(2)[:, None], np.arange(3)[None], targets] = True
    x = logits.astype(np.float64)
    full = np.log(np.exp(x).sum(-1)) - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    subset = np.log(np.where(mask, np.exp(x), 0).sum(-1)) - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(train.cross_entropy(logits, targets), full, rtol=1e-5)
    np.testing.assert_allclose(train.cross_entropy(logits, targets, mask), subset, rtol=1e-5)


def test_first_max_index_is_numpy_argmax_with_ties_and_infinities():
    from toyjax.train import first_max_index

    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, size=(64, 17)).astype(np.float32)  # small integers: many tied maxima
    logits[0] = -np.inf
    logits[1, 5] = np.inf
    logits[2, :] = 0.0
    np.testing.assert_array_equal(np.asarray(first_max_index(jax.numpy.asarray(logits))), np.argmax(logits, axis=-1))
