import json
import re
import shutil

import numpy as np
import pytest

import launch
from toyjax import compare
from toyjax.data import stories
from toyjax.testing import bigram_logits, bigram_run, tiny_config
from toyjax.tokenizers import TopWordTokenizer

PET = re.compile(r"also had an? \w+ that liked to \w+\. ")  # the construction the crippled run never sees


def test_a_crippled_run_is_hard_for_it_easy_for_the_others_on_its_missing_construction():
    # "Training" is add-0.1 bigram counting (exact, instant): two runs see normal stories, the crippled one the
    # same stories with every "X also had a dog that liked to run." sentence cut out.
    train_texts = stories.generate_texts(400, 0)
    tokenizer = TopWordTokenizer.fit(train_texts, vocab_size=150, simplify="unk")
    crippled_texts = [PET.sub("", t) for t in train_texts]
    assert all(not PET.search(t) for t in crippled_texts) and sum(bool(PET.search(t)) for t in train_texts) > 100
    runs = {"normal": bigram_run(tokenizer, bigram_logits(tokenizer, train_texts)),
            "other": bigram_run(tokenizer, bigram_logits(tokenizer, stories.generate_texts(400, 1))),
            "crippled": bigram_run(tokenizer, bigram_logits(tokenizer, crippled_texts))}
    texts = stories.generate_texts(60, 99)
    has_pet = [bool(PET.search(t)) for t in texts]
    results = compare.compare_runs(runs, texts, [], quiet=True)
    pairs = {(p["hard_for"], p["easy_for"]): p["examples"] for p in results["pairs"]}
    for other in ("normal", "other"):
        hard_for_crippled = pairs[("crippled", other)]
        assert len(hard_for_crippled) >= 5
        assert all(has_pet[e["id"]] for e in hard_for_crippled)
        for e in hard_for_crippled:  # the words responsible are the construction's own words
            construction = set(re.findall(r"\w+", PET.search(texts[e["id"]]).group(0).lower()))
            assert e["words"] and {w["word"] for w in e["words"]} <= construction, (e, construction)
        # The other way round, the construction is rarer than in the texts at large (z-scores are relative).
        reverse = [has_pet[e["id"]] for e in pairs[(other, "crippled")]]
        assert np.mean(reverse) < np.mean(has_pet) - 0.2


def test_zscores_and_contrasts_against_a_brute_force_loop():
    rng = np.random.default_rng(0)
    bpw = rng.normal(5, 1, size=(3, 12))
    z = compare.zscores(bpw)
    for m in range(3):
        mean, std = sum(bpw[m]) / 12, (sum((x - sum(bpw[m]) / 12) ** 2 for x in bpw[m]) / 12) ** 0.5
        np.testing.assert_allclose(z[m], [(x - mean) / std for x in bpw[m]])
    words = [[f"w{i}" for i in range(4)] for _ in range(12)]
    word_bits = [[rng.random(4) for _ in range(12)] for _ in range(3)]
    pairs, hard_all = compare.contrasts(["a", "b", "c"], bpw, word_bits, words, top=100)
    for pair in pairs:
        a, b = "abc".index(pair["hard_for"]), "abc".index(pair["easy_for"])
        expected = sorted((e for e in range(12) if z[a, e] - z[b, e] >= compare.PAIR_GAP), key=lambda e: z[b, e] - z[a, e])
        assert [e["id"] for e in pair["examples"]] == expected
    assert [e["id"] for e in hard_all] == sorted((e for e in range(12) if z[:, e].min() >= compare.ALL_Z),
                                                 key=lambda e: -z[:, e].min())


def test_a_bad_run_path_is_one_error_line_and_no_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert launch.main(["compare", str(tmp_path / "missing_a"), str(tmp_path / "missing_b"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing_a" in err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two tiny trained runs compared through launch.py; returns the output folder."""
    root = tmp_path_factory.mktemp("compare")
    from toyjax import train

    train.run(tiny_config(train={"steps": 4}), root / "run_a", quiet=True)
    shutil.copytree(root / "run_a", root / "run_b")  # the same model under two names: the report must say so
    out = root / "out"
    code = launch.main(["compare", str(root / "run_a"), str(root / "run_b"), "--out", str(out),
                        "--n-examples", "12", "--n-probes", "4", "--quiet"])
    assert code == 0
    return out


def test_compare_command_writes_consistent_reports(report):
    results = json.loads((report / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["run_a", "run_b"]
    assert len(results["examples"]) == 12 and len(results["probes"]) == 12
    a, b = results["runs"]
    assert a["bits_per_word"] == pytest.approx(b["bits_per_word"], rel=1e-5)  # identical params
    words = sum(len(e["words"]) for e in results["examples"])
    total = sum(sum(e["word_bits"]["run_a"]) for e in results["examples"])
    assert a["bits_per_word"] == pytest.approx(total / words, rel=1e-3)
    assert all(not p["examples"] for p in results["pairs"])  # identical models: nothing is hard for only one
    markdown = (report / "report.md").read_text()
    assert "| run_a | topword |" in markdown and "## Hard for all" in markdown


def test_report_html_in_a_headless_browser(report, browser_page):
    results = json.loads((report / "results.json").read_text())
    with browser_page(report / "report.html") as (page, problems):
        assert problems == []
        assert page.locator("#runs tbody tr").count() == 2
        assert page.locator("#probes tbody tr").count() == 6
        assert page.locator("#examples tbody tr").count() == 12
        assert page.locator(".words span").count() > 100
        column = 1  # "bits/word run_a"
        cells = lambda: [float(c) for c in page.locator(f"#examples tbody tr td:nth-child({column + 1})").evaluate_all(  # noqa: E731
            "cells => cells.map(c => c.getAttribute('data-value'))")]
        ids = lambda: [int(t) for t in page.locator("#examples tbody tr td:first-child").all_inner_texts()]  # noqa: E731
        assert ids() == list(range(12))
        page.locator("#examples th").nth(column).click()
        by_json = sorted(results["examples"], key=lambda e: -e["bits_per_word"]["run_a"])
        assert ids() == [e["id"] for e in by_json] and cells() == sorted(cells(), reverse=True)
        page.locator("#examples th").nth(column).click()
        assert cells() == sorted(cells())
        assert problems == []
