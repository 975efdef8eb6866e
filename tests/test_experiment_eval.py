"""An experiment scores a checkpoint exactly as its training run did: same grammar tables, same loss/ppl/accuracy."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from toyjax import runs, train
from toyjax.testing import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def load_experiment(name: str):
    """Returns the module of experiments/NAME.py (experiments are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sparse_output = load_experiment("sparse_output")


@pytest.fixture(scope="module", params=["full", "valid_subset"])
def trained(request, tmp_path_factory):
    """Returns (config, workdir, train.run's returned evaluation) of a tiny run on the structured corpus."""
    cfg = tiny_config(data={"source": "structured", "n_stories": 300}, model={"max_len": 32},
                      train={"loss": request.param, "steps": 8, "n_samples": 0})
    workdir = tmp_path_factory.mktemp(request.param)
    return cfg, workdir, train.run(cfg, workdir, quiet=True)


@pytest.fixture(scope="module")
def scoring(trained):
    """Returns sparse_output.checkpoint_scoring of the trained run and its scores of the final checkpoint."""
    run, batches, grammar, score = sparse_output.checkpoint_scoring(trained[1])
    return run, batches, grammar, score(run.params, batches)


def test_experiment_scores_with_the_grammar_training_used(trained, scoring):
    cfg, workdir, _ = trained
    _, _, _, training_grammar = runs.prepare(cfg, workdir, quiet=True)  # what train.run trained with
    grammar = scoring[2]
    for field in ("valid", "next_state", "features"):
        np.testing.assert_array_equal(np.asarray(getattr(grammar, field)), np.asarray(getattr(training_grammar, field)))
    assert grammar.feature_sizes == training_grammar.feature_sizes and grammar.start == training_grammar.start
    # A corpus of programs only: at a document's first token the grammar forbids most tokens (free_text=False).
    assert not np.asarray(grammar.valid[grammar.start]).all()


def test_experiment_evaluation_equals_train_runs_own(trained, scoring):
    cfg, _, result = trained
    run, _, _, scored = scoring
    assert run.step == cfg.train.steps
    for key in ("loss", "ppl", "accuracy"):
        assert scored[key] == pytest.approx(result[key], rel=1e-6, abs=1e-7), key
    # The arm's own loss is one of the measures every arm gets: the full softmax or the grammar-restricted one.
    own = "full_ppl" if cfg.train.loss == "full" else "restricted_ppl"
    assert scored[own] == pytest.approx(result["ppl"], rel=1e-5)


def test_shared_measures_match_a_float64_reference(scoring):
    run, batches, grammar, scored = scoring
    restricted, full, invalid, constrained, n_tokens = 0.0, 0.0, 0.0, 0, 0
    for batch in batches:
        valid_mask, features = train.model_inputs(batch, grammar)
        logits = np.asarray(jax.device_get(run.model.apply({"params": run.params}, batch["inputs"],
                                                           state_features=features, deterministic=True)), np.float64)
        valid_mask = np.asarray(valid_mask)
        targets = batch["targets"]
        target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        peak = logits.max(-1, keepdims=True)
        exp = np.exp(logits - peak)
        full_lse = np.log(exp.sum(-1)) + peak[..., 0]
        valid_lse = np.log(np.where(valid_mask, exp, 0).sum(-1)) + peak[..., 0]
        restricted += float((valid_lse - target_logit).sum())
        full += float((full_lse - target_logit).sum())
        forbids = ~valid_mask.all(-1)
        invalid += float((np.where(valid_mask, 0, exp).sum(-1) / exp.sum(-1))[forbids].sum())
        constrained += int(forbids.sum())
        n_tokens += targets.size
    assert constrained > 0
    assert scored["restricted_ppl"] == pytest.approx(np.exp(restricted / n_tokens), rel=1e-5)
    assert scored["full_ppl"] == pytest.approx(np.exp(full / n_tokens), rel=1e-5)
    assert scored["invalid_mass"] == pytest.approx(invalid / constrained, rel=1e-4, abs=1e-6)
