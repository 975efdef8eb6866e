"""The interp command on a tiny trained run: its numbers against plain forward passes, its page in a browser, and
one-line errors for bad input."""

import json

import numpy as np
import pytest

import launch
from toyjax import load_run, train
from toyjax.interp import report
from toyjax.testing import tiny_config

CLEAN = "amy had a red doll . she gave the doll to"
CORRUPTED = "ben had a red doll . he gave the doll to"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("interp") / "run"
    train.run(tiny_config(train={"steps": 4}), path, quiet=True)
    return path


def test_interp_command_writes_the_report(run_dir, tmp_path, browser_page):
    out = tmp_path / "out"
    assert launch.main(["interp", str(run_dir), "--text", CLEAN, "--corrupted", CORRUPTED, "--answer", "amy",
                        "--wrong", "ben", "--out", str(out)]) == 0
    for name in ("attention.png", "logit_lens.png", "dla.png", "patching_resid_pre.png", "patching_z.png",
                 "report.md", "report.html", "results.json"):
        assert (out / name).stat().st_size > 100, name
    results = json.loads((out / "results.json").read_text())
    run = load_run(run_dir)
    clean, corrupted = report.encode_text(run, CLEAN), report.encode_text(run, CORRUPTED)
    amy, ben = run.tokenizer.encode("amy")[0], run.tokenizer.encode("ben")[0]
    for tokens, key in ((clean, "clean"), (corrupted, "corrupted")):  # a plain forward pass, no hooks
        logits = np.asarray(run.model.apply({"params": run.params}, tokens))[0, -1]
        assert results["logit_difference"][key] == pytest.approx(logits[amy] - logits[ben], abs=1e-4)
    # Layer 0's residual input at a position where the two texts agree is the same in both runs: no recovery.
    same = np.asarray(clean[0] == corrupted[0])
    assert not same.all() and same.any()
    np.testing.assert_allclose(np.asarray(results["patching_resid_pre"])[0, same], 0.0, atol=1e-4)
    assert results["tokens"][1:4] == ["amy", "had", "a"]
    with browser_page(out / "report.html") as (page, problems):
        assert page.locator("#view-heads button").count() == 4  # 2 layers x 2 heads
        assert page.locator("#view-tokens .token").count() == clean.shape[1]
        assert page.locator("img").count() == 5
        page.hover("#view-tokens .token[data-position='3']")
        weights = [float(w) for w in page.eval_on_selector_all("#view-tokens .token", "s => s.map(x => x.dataset.weight)")]
        assert sum(weights) == pytest.approx(1.0, abs=1e-2) and all(w == 0 for w in weights[4:])  # causal
        assert problems == []


@pytest.mark.parametrize("args,message", [
    (["--text", "amy zqxj"], "cannot encode 'zqxj'"),
    (["--text", ""], "encodes to no tokens"),
    (["--text", " ".join(["the doll"] * 10)], "more than the run's model.max_len=16"),
    (["--text", CLEAN, "--corrupted", "ben had a doll"], "must be the same length"),
    (["--text", CLEAN, "--corrupted", CORRUPTED, "--answer", "zqxj"], "--answer 'zqxj' must be one known token"),
    (["--text", CLEAN, "--answer", "amy"], "need --corrupted"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert launch.main(["interp", str(run_dir), *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_missing_run_is_one_error_line(tmp_path, capsys):
    assert launch.main(["interp", str(tmp_path / "nope"), "--text", "amy", "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'} is not a toyjax run (no config.json)"
