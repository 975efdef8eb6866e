"""The induction-heads experiment's data and measures against brute force, and its script end to end."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import induction_heads as ih
from toyjax import interp
from toyjax.config import ModelConfig
from toyjax.models.decoder import Decoder, init_params

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "induction_heads.py"
TINY = ModelConfig(vocab_size=24, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=16, ffn="none")


def successors(row: np.ndarray) -> dict[int, list[int]]:
    """Brute force: every token of the row -> the tokens that followed it."""
    seen = {}
    for token, following in zip(row[:-1], row[1:]):
        seen.setdefault(int(token), []).append(int(following))
    return seen


def test_successor_rows_follow_one_permutation_per_row():
    settings = ih.RowSettings(symbols_min=5, symbols_max=9, keep=1.0)
    rows = ih.successor_rows(np.random.default_rng(0), 100, 60, 64, settings)
    assert rows.shape == (100, 60) and rows.dtype == np.int32 and rows.min() >= 0 and rows.max() < 64
    for row in rows:
        assert len(set(row.tolist())) <= 9
        follow = successors(row)
        assert all(len(set(after)) == 1 for after in follow.values()), row  # always the same successor
        firsts = [after[0] for after in follow.values()]
        assert len(set(firsts)) == len(firsts)  # no two tokens share a successor: a permutation


def test_successor_rows_keep_the_successor_at_the_chosen_rate():
    settings = ih.RowSettings(symbols_min=8, symbols_max=8, keep=0.8)
    rows = ih.successor_rows(np.random.default_rng(1), 40, 400, 64, settings)
    matches = []
    for row in rows:
        assert len(set(row.tolist())) == 8
        for after in successors(row).values():  # ~50 transitions per token: the most frequent one is the successor
            matches.append(np.mean(np.asarray(after) == np.bincount(after).argmax()))
    assert np.mean(matches) == pytest.approx(0.8 + 0.2 / 8, abs=0.02)


def test_analysis_rows_copy_the_segment_and_the_corruption_changes_only_the_first_copy():
    clean, corrupted, start = ih.analysis_rows(0, 8, 16, 24, 5)
    assert start == 11
    np.testing.assert_array_equal(clean[:, 6:11], clean[:, 11:])
    np.testing.assert_array_equal(clean[:, :6], corrupted[:, :6])
    np.testing.assert_array_equal(clean[:, 11:], corrupted[:, 11:])
    for fresh, segment in zip(corrupted[:, 6:11], clean[:, 11:]):
        assert not np.isin(fresh, segment).any()  # fresh tokens, none of them from the segment


@pytest.fixture(scope="module")
def tiny():
    model = Decoder(TINY)
    params = init_params(model, 3)
    params = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(4), x.shape), params)
    clean, corrupted, start = ih.analysis_rows(5, 4, TINY.max_len, TINY.vocab_size, 5)
    return (model, params), clean, corrupted, start


def test_head_scores_equal_loops_of_single_hooked_runs(tiny):
    run, clean, corrupted, start = tiny
    scores = ih.head_scores(run, clean, corrupted, start)
    metric = ih.second_copy_log_prob(clean, start)
    n_layers, n_heads = TINY.n_layers, TINY.n_heads
    _, cache = interp.run_with_cache(run, clean, [f"blocks.{i}.attn.hook_pattern" for i in range(n_layers)])
    _, corrupted_z = interp.run_with_cache(run, corrupted, [f"blocks.{i}.attn.hook_z" for i in range(n_layers)])
    base = float(metric(interp.run_with_hooks(run, clean, {})))
    corrupted_metric = float(metric(interp.run_with_hooks(run, corrupted, {})))
    half = clean.shape[1] - start
    for layer in range(n_layers):
        pattern = np.asarray(cache[f"blocks.{layer}.attn.hook_pattern"], np.float64)  # [batch, head, q, k]
        for head in range(n_heads):
            previous = np.mean([pattern[b, head, q, q - 1] for b in range(len(clean)) for q in range(1, 16)])
            induction = np.mean([pattern[b, head, q, q - half + 1] for b in range(len(clean)) for q in range(start, 16)])
            assert scores["previous"][layer, head] == pytest.approx(previous, abs=1e-6)
            assert scores["induction"][layer, head] == pytest.approx(induction, abs=1e-6)
            name = f"blocks.{layer}.attn.hook_z"
            zeroed = float(metric(interp.run_with_hooks(run, clean, {name: lambda z: z.at[:, :, head].set(0.0)})))
            assert scores["ablation"][layer, head] == pytest.approx(base - zeroed, abs=1e-4)
            swapped = corrupted_z[name][:, :, head]
            noised = float(metric(interp.run_with_hooks(run, clean, {name: lambda z: z.at[:, :, head].set(swapped)})))
            assert scores["noising"][layer, head] == pytest.approx((noised - base) / (corrupted_metric - base),
                                                                   abs=1e-4)
            offsets = [q - int(np.argmax(pattern[b, head, q])) for b in range(len(clean)) for q in range(start, 16)]
            assert scores["offset"][layer, head] == np.bincount(offsets).argmax()


def test_find_heads_picks_by_attention_and_checks_agreement():
    scores = {"previous": np.array([[0.1, 0.9], [0.5, 0.2]]), "induction": np.array([[0.0, 0.0], [0.5, 0.8]]),
              "ablation": np.array([[0.2, 3.0], [2.0, 0.1]]), "noising": np.array([[0.9, 0.1], [0.0, 0.7]])}
    found = ih.find_heads(scores)
    assert found["previous_token_head"] == [0, 1] and found["induction_head"] == [1, 1]
    assert found["previous_token_heads"] == [[0, 1]] and found["induction_heads"] == [[1, 0], [1, 1]]
    # ablation's top heads 0.1 and 1.0 are both picked by attention; noising's 0.0 is not
    assert found["agree"] == {"ablation": True, "noising": False}


def test_the_script_writes_findings_that_match_its_json(tmp_path):
    out = tmp_path / "out"
    args = ["--out", str(out), "--half", "5", "--quiet", "--config.train.steps=20", "--config.model.max_len=16",
            "--config.model.d_model=16", "--config.model.vocab_size=24"]
    assert ih.main(args) == 0
    found = json.loads((out / "findings.json").read_text())
    text = (out / "findings.md").read_text()
    for layer, row in enumerate(np.asarray(found["scores"]["ablation"])):
        for head, value in enumerate(row):
            line = next(l for l in text.splitlines() if l.startswith(f"| {layer}.{head}"))
            assert f"| {value:.3f} |" in line
    assert re.search(r"Loss on the second copy ([\d.]+) nats", text).group(1) == f"{found['losses']['second_copy']:.3f}"
    assert {p.name for p in out.iterdir()} >= {"attention.png", "ablation.png", "noising.png", "params.msgpack"}


@pytest.mark.parametrize("args,names", [(["--half", "40"], "--half=40"), (["--keep", "1.5"], "--keep=1.5"),
                                         (["--config.model.ffn=dense"], "model.ffn='dense'")])
def test_bad_input_is_one_error_line(tmp_path, args, names):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0]
    assert not out.exists()


def hand_built_induction_circuit(vocab: int = 16, length: int = 16, sharpness: float = 4.0, copy: float = 3.0):
    """Returns (model, params) of a 2-layer attention-only decoder wired by hand as the textbook circuit.

    d_model = 3 x 16: token one-hots, position one-hots, and a "previous token" slot. Head 0.0 attends from each
    position to the one before (query position i matches key position i - 1) and writes that key's token into the
    previous-token slot; head 1.0 attends from a token to the key whose previous token it is (K-composition) and
    copies that key's token into the token slot, which the tied unembedding reads. Heads 0.1 and 1.1 are zero.
    """
    cfg = ModelConfig(vocab_size=vocab, d_model=3 * 16, n_layers=2, n_heads=2, max_len=length, ffn="none")
    model = Decoder(cfg)
    params = jax.tree.map(jnp.zeros_like, init_params(model, 0))
    token, position, previous = (np.arange(16) + 16 * part for part in range(3))
    for name in ("block_0", "block_1"):
        params[name]["ln_attention"]["scale"] = jnp.ones(48)
    params["ln_final"]["scale"] = jnp.ones(48)
    params["embed"]["embedding"] = jnp.eye(vocab, 48)
    params["position"]["embedding"] = jnp.eye(length, 48, k=16)
    qkv0 = np.zeros((48, 3, 2, 24))
    qkv0[position, 0, 0, np.arange(16)] = sharpness  # query: my position i
    qkv0[position[:-1], 1, 0, np.arange(1, 16)] = 1.0  # key: position j, as slot j + 1
    qkv0[token, 2, 0, np.arange(16)] = 1.0  # value: the key's token
    out0 = np.zeros((2, 24, 48))
    out0[0, np.arange(16), previous] = 1.0  # -> the previous-token slot
    qkv1 = np.zeros((48, 3, 2, 24))
    qkv1[token, 0, 0, np.arange(16)] = sharpness  # query: my token
    qkv1[previous, 1, 0, np.arange(16)] = 1.0  # key: its previous token
    qkv1[token, 2, 0, np.arange(16)] = 1.0  # value: its own token
    out1 = np.zeros((2, 24, 48))
    out1[0, np.arange(16), token] = copy  # -> the token slot, read by the unembedding
    for name, qkv, out in (("block_0", qkv0, out0), ("block_1", qkv1, out1)):
        params[name]["attention"]["qkv"]["kernel"] = jnp.asarray(qkv, jnp.float32)
        params[name]["attention"]["out"]["kernel"] = jnp.asarray(out, jnp.float32)
    return model, params


def test_the_measures_find_the_heads_of_a_hand_built_induction_circuit():
    """A known circuit: the measures must single out heads 0.0 (previous token) and 1.0 (induction), all agreeing."""
    run = hand_built_induction_circuit()
    clean, corrupted, start = ih.analysis_rows(7, 16, 16, 16, 6)
    scores = ih.head_scores(run, clean, corrupted, start)
    found = ih.find_heads(scores)
    assert found == {"previous_token_head": [0, 0], "induction_head": [1, 0], "previous_token_heads": [[0, 0]],
                     "induction_heads": [[1, 0]], "agree": {"ablation": True, "noising": True}}
    assert scores["previous"][0, 0] > 0.95 and scores["induction"][1, 0] > 0.8  # chance repeats in the prefix share it
    assert scores["offset"][0, 0] == 1 and scores["offset"][1, 0] == 6 - 1
    losses = ih.copy_losses(run, clean, start)
    assert losses["second_copy"] < 0.6 and losses["prefix"] > 3.0  # measured 0.45 and 3.96
    composition = ih.composition_scores(run, clean, corrupted, start)
    assert composition[0] == pytest.approx([0.0, scores["noising"][0, 0], 0.0], abs=0.02)  # K-composition only
    np.testing.assert_allclose(composition[1], 0.0, atol=1e-6)  # the zero head acts through nothing


def test_training_grows_the_textbook_circuit_at_a_fixed_seed(tmp_path):
    """The experiment's own run, shortened: 1,500 steps at seed 0 (3,000 in the docs) grow the textbook pair."""
    found = ih.run_experiment(["--out", str(tmp_path / "out"), "--quiet", "--config.train.steps=1500"])
    scores, half = found["scores"], 12
    [[_, previous]] = found["previous_token_heads"]  # one previous-token head
    assert scores["offset"][0, previous] == 1 and scores["previous"][0, previous] > 0.45
    assert found["induction_heads"]
    for _, head in found["induction_heads"]:  # attends to the token after the earlier occurrence
        assert scores["offset"][1, head] == half - 1 and scores["induction"][1, head] > 0.4
    assert found["agree"] == {"ablation": True, "noising": True}
    assert found["composition"][previous, 1] > 0.8  # the previous-token head feeds layer 1's keys
    assert found["losses"]["second_copy"] < 1.0 and found["losses"]["prefix"] > 3.5  # measured 0.48 and 4.27
