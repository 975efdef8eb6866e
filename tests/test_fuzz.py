import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

import launch
from toyjax import fuzz, fuzz_edits, fuzz_report, probes as probes_lib
from toyjax.data import stories
from toyjax.runs import Run
from toyjax.testing import bigram_logits, bigram_run, tiny_config
from toyjax.tokenizers import TopWordTokenizer

CUE, BOOST, MAX_LEN = "happy", 8.0, 256


class CueModel:
    """Bigram logits, plus a cue: once "happy" has appeared, "she" gets +BOOST and "he" -BOOST, before it the reverse.

    Causal (a cumulative flag over earlier tokens); with max_len 256 every story is one window.
    """

    def __init__(self, tokenizer):
        self.cue, self.she, self.he = (tokenizer.token_to_id[w] for w in (CUE, "she", "he"))
        self.vocab_size = tokenizer.vocab_size

    def shift(self, tokens, xp):
        seen = xp.cumsum(tokens == self.cue, axis=-1) > 0
        direction = xp.zeros(self.vocab_size).at[self.she].set(1.0).at[self.he].set(-1.0) if xp is jnp else \
            np.bincount([self.she, self.he], weights=[1.0, -1.0], minlength=self.vocab_size)
        return xp.where(seen, BOOST, -BOOST)[..., None] * direction

    def apply(self, variables, tokens, *, state_features=None, deterministic=True):
        return variables["params"]["table"][tokens] + self.shift(tokens, jnp)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small-vocabulary tokenizer, a cue model and a bigram model on it, and a random BERT over story words."""
    texts = stories.generate_texts(300, 0)
    tokenizer = TopWordTokenizer.fit(texts, vocab_size=130, simplify="unk")
    table = bigram_logits(tokenizer, texts)
    cue_run = bigram_run(tokenizer, table, max_len=MAX_LEN)
    cue_run = Run(cue_run.config, cue_run.params, tokenizer, 0, CueModel(tokenizer))
    runs = {"cue": cue_run, "bigram": bigram_run(tokenizer, table, max_len=MAX_LEN)}
    words = sorted({w for t in texts for w in tokenizer.pre_tokenize(t)})
    config = fuzz.bert_lib.BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    folder = fuzz.bert_lib.write_random_folder(tmp_path_factory.mktemp("bert") / "bert", words, config)
    return {"tokenizer": tokenizer, "table": table, "runs": runs, "bert": fuzz.bert_lib.load(folder), "folder": folder}


def reference_scores(world, model: str, prompt: str, candidates: list[str]) -> np.ndarray:
    """Returns log p(candidate | prompt) per candidate by a float64 numpy forward of the stand-in model."""
    tokenizer, table = world["tokenizer"], np.asarray(world["table"], np.float64)
    out = []
    for candidate in candidates:
        ids = np.array([tokenizer.eos_id, *tokenizer.encode(f"{prompt} {candidate}")])
        logits = table[ids[:-1]]
        if model == "cue":
            logits = logits + CueModel(tokenizer).shift(ids[:-1], np)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        out.append(log_probs[-1, ids[-1]])  # every candidate here is one token
    return np.array(out)


def cued(probe) -> bool:
    return re.findall(r"[a-z]+", probe.prompt.lower()).count(CUE) == 1


def run_fuzz(world, seed=0, n_probes=12, **settings):
    """Fuzzes she/he pronoun probes: half with the cue and answer "she", half without it and answer "he"."""
    probe_stories = fuzz.held_out_stories(list(world["runs"].values()), 200, seed)
    pronouns = [p for p in probes_lib.make_probes(probe_stories, 200) if p.family == "pronoun"]
    probe_list = ([p for p in pronouns if p.answer.lower() == "she" and cued(p)][: n_probes // 2]
                  + [p for p in pronouns if p.answer.lower() == "he" and CUE not in p.prompt.lower()][: n_probes // 2])
    settings = fuzz.FuzzSettings(**{"budget": 60, "candidates_per_slot": 3, **settings})
    return fuzz.fuzz(world["runs"], world["bert"], probe_stories, probe_list, settings), probe_list


@pytest.fixture(scope="module")
def cue_results(world):
    return run_fuzz(world, oracles=("invariance", "differential"))


def test_the_fuzzer_finds_the_cue_a_model_relies_on(world, cue_results):
    results, probe_list = cue_results
    attacks = [a for a in results["attacks"] if a["oracle"] == "invariance" and a["models"] == ["cue"]]
    broken = [a for a in attacks if a["status"] == "broken"]
    assert len(broken) >= 3
    for a in broken:  # every break of the cue model edits the cue (removes it, or adds it)
        assert any(CUE in (e["old"].lower(), e["new"].lower()) for e in a["edits"]), a["edits"]
    # Every she-probe with the cue in its prompt is right on the clean text and breaks in one edit of the cue.
    by_story = {a["story"]: a for a in attacks}
    with_cue = [p for p in probe_list if p.answer.lower() == "she"]
    assert len(with_cue) == 6
    for p in with_cue:
        assert by_story[p.story]["status"] == "broken" and by_story[p.story]["n_edits"] == 1


def test_every_edit_is_in_every_target_vocabulary(world, cue_results):
    results, _ = cue_results
    tokenizer = world["tokenizer"]
    class_words = [w for words in fuzz_edits.WORD_CLASSES.values() for w in words]
    assert any(not probes_lib.in_vocabulary(tokenizer, w) for w in class_words)  # the restriction has teeth
    edits = [e for a in results["attacks"] if a["status"] == "broken" for e in a["edits"]]
    assert edits
    for e in edits:
        assert probes_lib.in_vocabulary(tokenizer, e["new"]), e
        assert fuzz_edits.CLASS_OF[e["new"].lower()] == fuzz_edits.CLASS_OF[e["old"].lower()]  # keep_class


def test_every_break_flips_the_oracle_under_an_independent_forward(world, cue_results):
    results, probe_list = cue_results
    probe_of = {p.story: p for p in probe_list}
    breaks = [a for a in results["attacks"] if a["status"] == "broken"]
    assert "invariance" in {a["oracle"] for a in breaks}
    for a in breaks:
        assert a["confirmed"]
        probe = probe_of[a["story"]]
        assert a["clean"] == probe.prompt and a["corrupted"] != probe.prompt
        before = {m: reference_scores(world, m, probe.prompt, probe.candidates) for m in a["models"]}
        after = {m: reference_scores(world, m, a["corrupted"], probe.candidates) for m in a["models"]}
        if a["oracle"] == "invariance":
            assert before[a["models"][0]].argmax() == 0 and after[a["models"][0]].argmax() != 0
        else:  # differential: agreed before, disagree after
            assert len({int(s.argmax()) for s in before.values()}) == 1
            assert len({int(s.argmax()) for s in after.values()}) == 2


def test_query_budget_is_never_exceeded_and_every_query_is_counted(world, monkeypatch):
    counted = []
    score_probes, continuation_bits = probes_lib.score_probes, fuzz.continuation_bits

    def counting_scores(run, probes, **kw):
        if kw.get("log_probs") is not fuzz.plain_token_log_probs:
            counted.append(len(probes))
        return score_probes(run, probes, **kw)

    def counting_bits(run, prompts, continuations, log_probs=None):
        if log_probs is not fuzz.plain_token_log_probs:
            counted.append(len(prompts))
        return continuation_bits(run, prompts, continuations, log_probs or fuzz.evaluate.token_log_probs)

    monkeypatch.setattr(fuzz.probes_lib, "score_probes", counting_scores)
    monkeypatch.setattr(fuzz, "continuation_bits", counting_bits)
    budget = 9
    results, _ = run_fuzz(world, n_probes=6, budget=budget, max_edits=3, beam_width=2)
    attacks = results["attacks"]
    assert max(a["queries"] for a in attacks) == budget  # the budget binds
    assert all(a["queries"] <= budget for a in attacks)
    charged = sum(a["queries"] - len(a["models"]) for a in attacks)
    assert sum(counted) == results["queries"]["total"] == results["queries"]["clean"] + charged


def test_a_fixed_seed_reproduces_the_run(world):
    first, _ = run_fuzz(world, n_probes=4, oracles=("invariance", "differential"))
    again, _ = run_fuzz(world, n_probes=4, oracles=("invariance", "differential"))
    assert any(a["status"] == "broken" for a in first["attacks"])
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    other, _ = run_fuzz(world, seed=1, n_probes=4, oracles=("invariance",))
    assert {a["story"]: a.get("clean") for a in other["attacks"]} != {a["story"]: a.get("clean") for a in again["attacks"]}


def test_beam_search_finds_the_fewest_most_plausible_breaking_edits_against_brute_force():
    rng = np.random.default_rng(0)
    edits = [fuzz_edits.Edit((i // 2,), "a", f"w{i}", 0.0, float(rng.normal())) for i in range(10)]
    needed = [{1, 4}, {7, 8}, {2, 9}]  # break iff the set contains one of these pairs
    calls = []

    def evaluate_sets(sets):
        calls.append(len(sets))
        return [-1.0 if any(n <= set(s) for n in needed) else 10.0 - len(s) for s in sets]

    best, spent, seen = fuzz.beam_search(edits, evaluate_sets, max_edits=3, beam_width=100, budget=10_000)
    assert spent == sum(calls) and len(calls) <= 3  # one batched call per depth (and none to minimise)
    feasible = [n for n in needed if len({edits[i].positions for i in n}) == 2]
    expected = max(feasible, key=lambda n: sum(edits[i].relative for i in n))
    assert set(best) == expected


def test_launch_fuzz_writes_reports_that_pass_the_browser_check(tmp_path, world, browser_page):
    from toyjax import train

    train.run(tiny_config(train={"steps": 4}), tmp_path / "run", quiet=True)
    out = tmp_path / "out"
    code = launch.main(["fuzz", str(tmp_path / "run"), "--bert", str(world["folder"]), "--out", str(out),
                        "--budget", "12", "--n-probes", "2", "--max-edits", "2", "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    breaks = json.loads((out / "breaks.json").read_text())
    assert all((out / name).stat().st_size > 1000 for name in fuzz_report.CURVES)
    assert "## Summary" in (out / "report.md").read_text()
    with browser_page(out / "report.html") as (page, problems):
        assert problems == []
        assert page.locator("#summary tbody tr").count() == len(summary["summary"]) > 0
        assert page.locator("#breaks tbody tr").count() == len(breaks)
        assert page.locator("img").count() == 2
        assert page.locator("img").evaluate_all("imgs => imgs.every(i => i.naturalWidth > 0)")
        page.locator("#summary th").nth(7).click()  # mean queries, descending
        cells = page.locator("#summary tbody tr td:nth-child(8)").evaluate_all(
            "cells => cells.map(c => c.getAttribute('data-value'))")
        values = [float(c) for c in cells if c not in (None, "", "None")]
        assert values == sorted(values, reverse=True)
        assert problems == []


def test_missing_bert_is_one_error_line_that_says_how_to_make_one(tmp_path, monkeypatch, capsys, world):
    monkeypatch.delenv("TOYJAX_BERT", raising=False)
    out = tmp_path / "out"
    assert launch.main(["fuzz", str(tmp_path / "any_run"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "launch.py bert-adapt" in err[0]
    headless = fuzz.bert_lib.write_random_folder(tmp_path / "headless", ["a"], with_mlm_head=False)
    assert launch.main(["fuzz", str(tmp_path / "any_run"), "--bert", str(headless), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLM head" in err[0] and "bert-adapt" in err[0]
    assert not out.exists()
