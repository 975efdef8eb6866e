import json
import math
import re

import pytest

from experiments import three_models
from toyjax import probes

ARMS = ["dense", "topk", "moe"]
TINY = ["--config.data.n_stories=200", "--config.data.valid_fraction=0.1", "--config.tokenizer.vocab_size=200",
        "--config.model.d_model=16", "--config.model.n_layers=1", "--config.model.n_heads=2",
        "--config.model.d_ff=32", "--config.model.max_len=32", "--config.model.attention_top_k=4",
        "--config.model.moe.n_experts=2",
        "--config.train.steps=4", "--config.train.batch_size=4", "--config.train.warmup_steps=2",
        "--config.train.log_every=2", "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
        "--config.train.eval_batches=1", "--config.train.n_samples=0", "--n-examples", "12", "--n-probes", "8",
        "--quiet"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The whole script at tiny sizes; returns (out folder, results.json, findings.md)."""
    out = tmp_path_factory.mktemp("three") / "out"
    assert three_models.main(["--out", str(out), *TINY]) == 0
    return out, json.loads((out / "results.json").read_text()), (out / "findings.md").read_text()


def table(markdown: str, first_header: str) -> dict[str, dict[str, str]]:
    """Returns a Markdown table (the one whose first header cell is first_header) as {first cell: {header: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_findings_and_results_list_all_three_models_and_every_family(experiment):
    out, results, findings = experiment
    assert [r["name"] for r in results["runs"]] == ARMS
    parts = {r["name"]: (r["model"]["attention"], r["model"]["ffn"]) for r in results["runs"]}
    assert parts == {"dense": ("dense", "dense"), "topk": ("topk", "dense"), "moe": ("dense", "moe")}
    moe_config = json.loads((out / "moe" / "config.json").read_text())["model"]
    assert moe_config["d_ff"] == 32 // moe_config["moe"]["top_k"] and moe_config["moe"]["capacity_factor"] == 0
    assert list(table(findings, "model")) == ARMS
    assert list(table(findings, "family")) == list(probes.FAMILIES)
    for family in probes.FAMILIES:
        assert re.search(rf"^- \*\*{family}\*\* (\*\*separates\*\*|does not separate): ", findings, re.M)
    assert set(results["findings"]["families"]) == set(probes.FAMILIES)
    assert [f"### hard for {name}" in findings for name in ARMS] == [True] * 3


def test_the_numbers_in_findings_equal_those_in_results_json(experiment):
    _, results, findings = experiment
    models = table(findings, "model")
    for run in results["runs"]:
        row = models[run["name"]]
        assert float(row["bits/word"]) == round(run["bits_per_word"], 4)
        assert float(row["valid ppl"]) == round(results["arms"][run["name"]]["valid_ppl"], 4)
        assert int(row["params"].replace(",", "")) == run["params"] and int(row["steps"]) == run["step"] == 4
    cell = re.compile(r"([\d.]+) ± ([\d.]+) \((\d+)/(\d+) of (\d+)\)")
    families = table(findings, "family")
    for family in probes.FAMILIES:
        rows = [p for p in results["probes"] if p["family"] == family]
        for name in ARMS:
            accuracy, se, correct, expressible, n = cell.fullmatch(families[family][name]).groups()
            # Counted again here from the per-probe results, and the standard error by hand.
            scored = [p["results"][name] for p in rows if p["results"][name]["expressible"]]
            counted = (sum(r["correct"] for r in scored), len(scored), len(rows))
            assert (int(correct), int(expressible), int(n)) == counted
            if scored:
                p = int(correct) / int(expressible)
                assert float(accuracy) == round(p, 4)
                assert float(se) == round(math.sqrt(p * (1 - p) / int(expressible)), 4)
            assert results["findings"]["families"][family][name]["correct"] == int(correct)
        for better, worse, gap, se in re.findall(rf"(\w+) [>=] (\w+) by ([\d.]+) \(se ([\d.]+)",
                                                 findings.split(f"- **{family}**")[1].splitlines()[0]):
            pair = next(p for p in results["findings"]["separations"][family]["pairs"]
                        if (p["better"], p["worse"]) == (better, worse))
            assert float(gap) == round(pair["gap"], 4) and float(se) == round(pair["se"], 4)
    assert any(families[f]["dense"].endswith(f"of {8})") for f in probes.FAMILIES)


def test_the_arms_share_one_tokenizer(experiment):
    out, _, _ = experiment
    files = [(out / arm / "tokenizer" / "toyjax_tokenizer.json").read_bytes() for arm in ARMS]
    assert files[0] == files[1] == files[2]


def test_separations_against_hand_computed_two_proportion_tests():
    def model(correct, n):
        return {"correct": correct, "expressible": n, "accuracy": correct / n}

    stats = {"owner": {"a": model(90, 100), "b": model(70, 100), "c": model(88, 100)},
             "pronoun": {"a": model(100, 100), "b": model(100, 100), "c": model(100, 100)}}
    found = three_models.separations(stats)
    pairs = {(p["better"], p["worse"]): p for p in found["owner"]["pairs"]}
    # pooled p = (90 + 70) / 200 = 0.8: se = sqrt(0.8 * 0.2 * (1/100 + 1/100)) = 0.056569, gap 0.2 = 3.54 se
    assert pairs[("a", "b")]["se"] == pytest.approx(0.0565685, abs=1e-6)
    assert pairs[("a", "b")]["ratio"] == pytest.approx(3.5355, abs=1e-4) and pairs[("a", "b")]["separates"]
    # pooled 0.89: se = sqrt(0.89 * 0.11 * 0.02) = 0.044249, gap 0.02 = 0.45 se
    assert pairs[("a", "c")]["se"] == pytest.approx(0.0442493, abs=1e-6) and not pairs[("a", "c")]["separates"]
    assert pairs[("c", "b")]["separates"] and found["owner"]["separates"]
    assert [(p["better"], p["worse"]) for p in found["owner"]["pairs"]] == [("a", "b"), ("c", "b"), ("a", "c")]
    assert not found["pronoun"]["separates"] and all(p["gap"] == 0 for p in found["pronoun"]["pairs"])
    assert three_models.binomial_se(0.9, 100) == pytest.approx(0.03)


def test_hard_for_one_needs_the_gap_against_both_others():
    def example(i, z, bits):
        return {"id": i, "words": ["a", "b", "c"], "z": dict(zip(ARMS, z)), "word_bits": dict(zip(ARMS, bits))}

    flat = [[1, 1, 1]] * 3
    results = {"runs": [{"name": n} for n in ARMS], "hardness": {"pair_gap": 1.0}, "examples": [
        example(0, [1.5, 0.2, 0.4], flat),  # hard for dense: gaps 1.3 and 1.1
        example(1, [1.5, 1.0, -0.5], flat),  # not: only 0.5 above topk
        example(2, [-0.5, 0.0, 2.0], flat),  # hard for moe: gaps 2.5 and 2.0
        example(3, [2.5, 0.0, 0.0], [[1, 5, 2], [1, 1, 2.5], [0.5, 2, 1]]),  # hard for dense, by 2.5
    ]}
    found = three_models.hard_for_one(results, k=5)
    assert [(e["id"], e["min_gap"]) for e in found["dense"]] == [(3, 2.5), (0, pytest.approx(1.1))]
    assert found["topk"] == [] and [e["id"] for e in found["moe"]] == [2]
    # dense pays [1, 5, 2] against the cheapest other's [1, 2, 2.5]: only "b" costs it more, by 3 bits
    assert found["dense"][0]["words"] == [{"index": 1, "word": "b", "bits": 3.0}]


def test_model_answer_is_the_best_scored_candidate():
    row = {"answer": "Tom", "wrong": ["Lily", "Ben"],
           "results": {"dense": {"expressible": True, "scores_bits": [-3.0, -1.0, -5.0]},
                       "moe": {"expressible": False, "scores_bits": None}}}
    assert three_models.model_answer(row, "dense") == "Lily" and three_models.model_answer(row, "moe") is None


@pytest.mark.parametrize("bad, says", [
    ("--config.model.d_modle=3", "model.d_model"),
    ("--config.model.attention=topk", "set per arm"),
    ("--config.model.moe.top_k=3", "model.moe.top_k=3"),
    ("--n-probes=0", "--n-probes"),
])
def test_a_bad_setting_is_one_error_line_and_no_output(tmp_path, capsys, bad, says):
    out = tmp_path / "out"
    assert three_models.main(["--out", str(out), bad]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert not out.exists()
