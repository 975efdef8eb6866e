"""Fuzzer breaks explained by patching: summaries against a brute-force loop of hooked runs, causality and exact
restoration, the metric against the probe's own scoring, and the script end to end on a real fuzzer break."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import explain_breaks
from toyjax import fuzz, interp, probes as probes_lib
from toyjax.cli import run_reporting_errors
from toyjax.config import ModelConfig
from toyjax.data import stories
from toyjax.evaluate import LN2, window_plan
from toyjax.interp import explain
from toyjax.models.decoder import Decoder
from toyjax.runs import load_run
from toyjax.testing import tiny_config

from conftest import ROOT

ANSWER, WRONG = 3, 11


@pytest.fixture(scope="module")
def decoder():
    """A tiny random decoder (weights scaled up so patches matter) and a clean prompt of 7 tokens."""
    cfg = ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=8)
    model = Decoder(cfg)
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.integers(0, 20, (1, 7)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), clean)["params"]
    params = jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), params)
    return model, params, clean


def patch_all(model, params, clean, corrupted):
    return {part: explain.make_patcher(model, *explain.PATCHES[part])(params, clean, corrupted, ANSWER, WRONG)
            for part in explain.PATCHES}


def brute_force(model, params, clean, corrupted, part):
    """Returns recovered fractions [layer, pos or head] from one hooked full forward pass per patch (float64)."""
    activation, index = explain.PATCHES[part]
    run = (model, params)
    metric = lambda logits: float(np.float64(logits[0, -1, ANSWER]) - np.float64(logits[0, -1, WRONG]))  # noqa: E731
    names = [f"blocks.{i}.{activation}" for i in range(model.cfg.n_layers)]
    clean_logits, cache = interp.run_with_cache(run, clean, names)
    clean_value, corrupted_value = metric(clean_logits), metric(interp.run_with_hooks(run, corrupted, {}))
    width = cache[names[0]].shape[2 if index == "head" else 1]
    out = np.zeros((len(names), width))
    for layer, name in enumerate(names):
        for j in range(width):
            where = (slice(None), slice(None), j) if index == "head" else (slice(None), j)
            hook = {name: lambda x, where=where, value=cache[name]: x.at[where].set(value[where])}
            out[layer, j] = (metric(interp.run_with_hooks(run, corrupted, hook)) - corrupted_value) / (clean_value - corrupted_value)
    return out


def test_summaries_name_the_cells_a_brute_force_loop_of_hooked_runs_finds(decoder):
    model, params, clean = decoder
    edited = (2, 4)
    corrupted = clean.at[0, 2].set((clean[0, 2] + 5) % 20).at[0, 4].set((clean[0, 4] + 7) % 20)
    labels = [f"t{i}" for i in range(7)]
    results = patch_all(model, params, clean, corrupted)
    for part in ("resid_pre", "attn_out", "mlp_out", "heads"):
        want = brute_force(model, params, clean, corrupted, part)
        np.testing.assert_allclose(np.asarray(results[part].recovered), want, atol=2e-4)
        assert np.ptp(want) > 0.05  # the patches matter
        if part == "heads":
            summary = explain.summarize_heads(results[part], k=2)
            top = summary["top_heads"][0]
            assert want[top["layer"], top["head"]] == pytest.approx(want.max(), abs=1e-4)
        else:
            summary = explain.summarize_positions(results[part], labels, edited, k=2)
            top = summary["top_cells"][0]
            assert want[top["layer"], top["position"]] == pytest.approx(want.max(), abs=1e-4)
            assert top["token"] == labels[top["position"]] and top["edited"] == (top["position"] in edited)
            position = summary["top_positions"][0]["position"]
            assert want[:, position].max() == pytest.approx(want.max(axis=0).max(), abs=1e-4)
            assert summary["edited_best"] == pytest.approx(want[:, list(edited)].max(), abs=1e-4)
            assert summary["elsewhere_best"] == pytest.approx(np.delete(want, edited, axis=1).max(), abs=1e-4)
        layer = summary["top_layers"][0]
        assert layer["recovered"] == pytest.approx(want.max(axis=1).max(), abs=1e-4)
        assert want[layer["layer"]].max() == pytest.approx(want.max(), abs=1e-4)


def test_one_edit_is_restored_exactly_at_layer_0_and_earlier_positions_do_nothing(decoder):
    model, params, clean = decoder
    edit = 3
    corrupted = clean.at[0, edit].set((clean[0, edit] + 9) % 20)
    results = patch_all(model, params, clean, corrupted)
    resid = np.asarray(results["resid_pre"].recovered)
    # The layer-0 residuals differ only at the edit: patching it there is patching the whole clean residual.
    np.testing.assert_allclose(resid[0, edit], 1.0, atol=1e-5)
    np.testing.assert_allclose(np.delete(resid[0], edit), 0.0, atol=1e-6)
    for part in ("resid_pre", "attn_out", "mlp_out"):  # causality: nothing before the edit sees it
        np.testing.assert_allclose(np.asarray(results[part].recovered)[:, :edit], 0.0, atol=1e-6)
    summary = explain.summarize_positions(results["resid_pre"], [str(i) for i in range(7)], (edit,), k=1)
    assert summary["edited_best"] == pytest.approx(resid.max()) and summary["top_cells"][0]["edited"]
    assert abs(float(results["resid_pre"].clean) - float(results["resid_pre"].corrupted)) > 1e-2


# -- a real run, a real fuzzer break --------------------------------------------------------------------------


def flip_oracle():
    """An answer oracle breaking when a fact-free edit changes the model's pick (right or not): a tiny barely
    trained model rarely answers right, so the stock oracles would find no break to explain."""
    invariance = fuzz.ORACLES["invariance"]
    return dataclasses.replace(invariance, name="flip", applies=lambda clean: True,
                               distance=lambda clean, edited, settings: 1.0 if np.argmax(clean[0]) == np.argmax(edited[0]) else -1.0)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A tiny trained run (max_len 16: prompts are windowed), a random BERT, and the fuzzer's breaks.json on them."""
    from toyjax import train

    root = tmp_path_factory.mktemp("explain")
    train.run(tiny_config(train={"steps": 4}), root / "run", quiet=True)
    run = load_run(root / "run")
    texts = stories.generate_texts(300, 0)
    words = sorted({w for t in texts for w in run.tokenizer.pre_tokenize(t)})
    config = fuzz.bert_lib.BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    bert = fuzz.bert_lib.load(fuzz.bert_lib.write_random_folder(root / "bert", words, config))
    probe_stories = fuzz.held_out_stories([run], 60, 0)
    probe_list = probes_lib.make_probes(probe_stories, 3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fuzz.ORACLES, "flip", flip_oracle())
        results = fuzz.fuzz({"run": run}, bert, probe_stories, probe_list,
                            fuzz.FuzzSettings(budget=24, max_edits=2, oracles=("flip",)))
    breaks = [a for a in results["attacks"] if a["status"] == "broken"]
    assert breaks, "the fuzzer found no break to explain"
    # A substitution record (renamed answers) must be skipped, with its reason, not patched.
    breaks.append({**breaks[0], "oracle": "substitution"})
    path = root / "fuzz" / "breaks.json"
    path.parent.mkdir()
    path.write_text(json.dumps(breaks, indent=1))  # as fuzz_report.main writes it
    return {"root": root, "run": run, "breaks": breaks, "path": path}


def test_the_metric_is_the_probes_own_score_margin_in_the_fuzzers_window(fuzzed):
    run, checked = fuzzed["run"], 0
    for record in fuzzed["breaks"][:-1]:
        pair = explain.align_pair(run.tokenizer, record["clean"], record["corrupted"], run.config.model.max_len)
        metric = explain.pair_metric(run.tokenizer, record["clean"], record["corrupted"], record["before"][0],
                                     record["after"][0])
        if isinstance(pair, str) or isinstance(metric, str) or not metric.equals_probe_margin:
            continue
        ids = [run.tokenizer.eos_id, *run.tokenizer.encode(record["clean"])]
        assert len(ids) > run.config.model.max_len  # the window matters here
        np.testing.assert_array_equal(pair.clean[0], ids[-pair.clean.shape[1]:])
        for prompt, tokens in ((record["clean"], pair.clean), (record["corrupted"], pair.corrupted)):
            probe = probes_lib.Probe(record["family"], 0, prompt, metric.answer, [metric.wrong], [])
            margin = probes_lib.score_probes(run, [probe])[0]["margin_bits"] * LN2
            logits = run.model.apply({"params": run.params}, jnp.asarray(tokens))
            assert float(logits[0, -1, metric.answer_id] - logits[0, -1, metric.wrong_id]) == pytest.approx(margin, abs=1e-4)
        checked += 1
    assert checked >= 1


def test_pairs_that_do_not_line_up_are_skipped_with_the_reason(fuzzed):
    tokenizer, prompt = fuzzed["run"].tokenizer, fuzzed["breaks"][0]["clean"]
    words = prompt.split(" ")
    longer = " ".join(["the", *words])
    assert "token count" in explain.align_pair(tokenizer, prompt, longer, 16)
    first = next(i for i, w in enumerate(words) if w.isalpha() and w != "the")
    early = " ".join(words[:first] + ["the"] + words[first + 1:])  # an edit before the last 16-token window
    assert "outside the model's window" in explain.align_pair(tokenizer, prompt, early, 16)
    assert "renames the answers" in explain.picks({"oracle": "substitution"}, "run")


def test_the_script_writes_what_a_direct_patch_activation_call_gives(fuzzed, tmp_path):
    out = tmp_path / "explained"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "explain_breaks.py"), str(fuzzed["path"]),
                           "--runs", str(fuzzed["root"] / "run"), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads((out / "explanations.json").read_text())
    entries = found["explanations"]
    assert len(entries) == len(fuzzed["breaks"])
    assert "renames the answers" in entries[-1]["reason"]
    explained = [e for e in entries if e["status"] == "explained"]
    assert explained and found["explained"] == len(explained)
    run, max_len = fuzzed["run"], fuzzed["run"].config.model.max_len
    for entry in explained:
        record = fuzzed["breaks"][entry["break"]]
        assert (entry["answer"], entry["wrong"]) == (record["before"][0], record["after"][0])
        windows = []
        for prompt in (record["clean"], record["corrupted"]):
            ids = [run.tokenizer.eos_id, *run.tokenizer.encode(prompt)]
            begin = window_plan(len(ids), max_len, max_len // 2)[-1][0]
            windows.append(jnp.asarray([ids[begin:]], jnp.int32))
        assert entry["edited_positions"] == np.flatnonzero(np.asarray(windows[0] != windows[1])[0]).tolist()
        metric = interp.logit_difference(entry["answer_id"], entry["wrong_id"])
        for part, (activation, index) in explain.PATCHES.items():
            direct = interp.patch_activation(run, *windows, metric, activation, index=index)
            np.testing.assert_allclose(entry["patching"][part]["recovered"], np.asarray(direct.recovered), atol=1e-5)
            assert (out / f"break{entry['break']:03d}_run_{part}.png").read_bytes()[:4] == b"\x89PNG"
        assert entry["clean_metric"] == pytest.approx(float(direct.clean), abs=1e-5)
    heads = found["aggregate"]["run"]["heads"]
    assert sum(h["times_in_top"] for h in heads) == len(explained) * min(3, len(heads))
    report = (out / "report.md").read_text()
    assert f"## Break {explained[0]['break']}" in report and "# Across breaks, per model" in report


@pytest.mark.parametrize("case", ["missing", "not_json", "summary", "no_runs", "runs_not_found", "wrong_run_name"])
def test_bad_inputs_are_one_error_line_and_no_output(fuzzed, tmp_path, capsys, case):
    path, out = fuzzed["path"], tmp_path / "out"
    runs = ["--runs", str(fuzzed["root"] / "run")]
    if case == "missing":
        path = tmp_path / "nope.json"
    elif case in ("not_json", "summary"):
        path = tmp_path / "bad.json"
        path.write_text("{not json" if case == "not_json" else json.dumps({"models": ["run"], "summary": []}))
    elif case == "no_runs":
        runs = []
    elif case == "runs_not_found":
        runs = ["--runs-from", str(tmp_path / "elsewhere")]
    else:
        runs = ["--runs", str(tmp_path / "other")]
    assert run_reporting_errors(explain_breaks.main, [str(path), *runs, "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert {"missing": "no such file", "not_json": "not JSON", "summary": "not a fuzzer breaks.json",
            "no_runs": "--runs", "runs_not_found": "not a toyjax run", "wrong_run_name": "names model 'run'"}[case] in err[0]
    assert not out.exists()
