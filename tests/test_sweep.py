import csv
import json
import math

import jax
import numpy as np
import pytest

import launch
from toyjax import load_run, sweep, train
from toyjax.config import Config, ConfigError
from toyjax.runs import read_metrics
from toyjax.testing import tiny_config

GRID = {"model.d_model": [16, 32]}
SEEDS = [0, 1]
INTERRUPT_AT = 2  # the third job (d_model=32, seed 0) stops after this step, as a pre-empted job would


def base_config():
    return tiny_config(data={"n_stories": 150}, model={"n_layers": 1},
                       train={"steps": 4, "eval_every": 4, "checkpoint_every": 2, "log_every": 2, "n_samples": 0})


class Preempted(Exception):
    pass


# -- the grid, names and aggregation (no training) -------------------------------------------------------------


def test_cross_product_zip_and_names():
    grid = sweep.parse_grid(["model.d_model=64,128", "tokenizer.vocab_size=500,2000"], Config())
    assert grid == {"model.d_model": [64, 128], "tokenizer.vocab_size": [500, 2000]}
    points = sweep.expand_points(grid)
    assert points == [{"model.d_model": a, "tokenizer.vocab_size": b} for a in (64, 128) for b in (500, 2000)]
    assert sweep.expand_points(grid, paired=True) == [{"model.d_model": 64, "tokenizer.vocab_size": 500},
                                                      {"model.d_model": 128, "tokenizer.vocab_size": 2000}]
    assert sweep.point_names(points[:2], [0, 1]) == [
        "d_model=64,vocab_size=500,seed=0", "d_model=64,vocab_size=500,seed=1",
        "d_model=64,vocab_size=2000,seed=0", "d_model=64,vocab_size=2000,seed=1"]
    # Two keys ending in the same name keep their sections; odd characters become '_' and a hash keeps names unique.
    both = sweep.expand_points({"model.vocab_size": [0], "tokenizer.vocab_size": [500], "data.source": ["a/b", "a_b"]})
    names = sweep.point_names(both, [0])
    assert all(n.startswith("model.vocab_size=0,tokenizer.vocab_size=500,source=a_b,seed=0-") for n in names)
    assert len(set(names)) == 2 and all("/" not in n for n in names)
    # Values take the field's type: a float key parses '1e-3', a bool key 'yes'.
    assert sweep.parse_grid(["train.learning_rate=1e-3", "model.tie_embeddings=yes,no"], Config()) == {
        "train.learning_rate": [0.001], "model.tie_embeddings": [True, False]}


@pytest.mark.parametrize("items, paired, message", [
    (["model.d_model=64,128", "train.steps=10"], True, "same number of values; got model.d_model: 2, train.steps: 1"),
    (["model.d_modle=64"], False, "unknown config key 'model.d_modle'; did you mean 'model.d_model'?"),
    (["model.d_model=64,big"], False, "config key 'model.d_model' expects int, got 'big'"),
    (["model.d_model=64,64"], False, "repeats the value(s) 64"),
    (["model.d_model"], False, "must look like model.d_model=64,128"),
    (["train.seed=1,2"], False, "--seeds"),
])
def test_bad_grids_are_errors(items, paired, message):
    with pytest.raises(ConfigError) as err:
        sweep.expand_points(sweep.parse_grid(items, Config()), paired=paired)
    assert message in str(err.value)


def test_bad_grid_value_on_the_command_line_makes_nothing(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    code = launch.main(["sweep", "--config", "experiments/configs/quickstart.py", "--workdir", str(workdir),
                        "--grid", "model.d_model=64,1.5", "--seeds", "0,1"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines() == ["error: config key 'model.d_model' expects int, got '1.5'"]
    assert not workdir.exists()


def test_aggregate_is_mean_and_sample_std_over_seeds():
    rows = [{"model.d_model": 64, "seed": s, "ppl": v, "loss": 0.0} for s, v in zip((0, 1, 2), (1.0, 2.0, 4.0))]
    rows.append({"model.d_model": 128, "seed": 0, "ppl": 5.0, "loss": 0.0})
    table = sweep.aggregate(rows, ["model.d_model"], ("ppl", "loss"))
    # By hand: mean (1 + 2 + 4) / 3 = 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, / (3 - 1) = 7/3.
    assert [e["point"] for e in table] == [{"model.d_model": 64}, {"model.d_model": 128}]
    assert [e["n"] for e in table] == [3, 1]
    assert table[0]["mean"]["ppl"] == pytest.approx(7 / 3) and table[0]["std"]["ppl"] == pytest.approx(math.sqrt(7 / 3))
    assert table[1]["mean"]["ppl"] == 5.0 and math.isnan(table[1]["std"]["ppl"])
    assert sweep.format_spread(7 / 3, math.sqrt(7 / 3)) == "2.333 ± 1.5"
    assert sweep.format_spread(25139.3, 1234.4) == "25,139 ± 1,234" and sweep.format_spread(5.0, math.nan) == "5"


# -- a real sweep, pre-empted in its third job and run again ----------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    """Runs 2 points x 2 seeds; the first attempt stops inside job 3, the second finishes. Returns what it saw."""
    workdir = tmp_path_factory.mktemp("sweep")
    points = sweep.expand_points(GRID)
    names = sweep.point_names(points, SEEDS)
    real_run = train.run

    def preempted_run(cfg, run_dir, **kwargs):
        if run_dir.name == names[2]:
            real_run(cfg, run_dir, until=INTERRUPT_AT, **kwargs)
            raise Preempted
        return real_run(cfg, run_dir, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "run", preempted_run)
        with pytest.raises(Preempted):
            sweep.run_sweep(base_config(), points, workdir, seeds=SEEDS, echo=lambda line: None)
    finished = {n: {p: p.stat().st_mtime_ns for p in (workdir / n / "checkpoints").rglob("*")} for n in names[:2]}
    calls, lines = [], []

    def recorded_run(cfg, run_dir, **kwargs):
        calls.append(run_dir.name)
        return real_run(cfg, run_dir, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "run", recorded_run)
        rows = sweep.run_sweep(base_config(), points, workdir, seeds=SEEDS, echo=lines.append)
    return {"workdir": workdir, "names": names, "points": points, "rows": rows, "calls": calls, "lines": lines,
            "finished": finished}


def test_sweep_writes_one_row_per_point_and_seed_and_a_table_and_plot(interrupted_sweep):
    workdir, names = interrupted_sweep["workdir"], interrupted_sweep["names"]
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], int(r["model.d_model"]), int(r["seed"])) for r in rows] == [
        (names[0], 16, 0), (names[1], 16, 1), (names[2], 32, 0), (names[3], 32, 1)]
    for row in rows:
        run_dir = workdir / row["name"]
        last_valid = [r for r in read_metrics(run_dir) if r["split"] == "valid"][-1]
        assert last_valid["step"] == 4 and float(row["loss"]) == pytest.approx(last_valid["loss"])
        assert float(row["ppl"]) == pytest.approx(np.exp(last_valid["loss"]))
        assert float(row["accuracy"]) == pytest.approx(last_valid["accuracy"])
        run = load_run(run_dir)
        assert run.config.train.seed == int(row["seed"]) and run.config.model.d_model == int(row["model.d_model"])
        assert int(row["params"]) == sum(leaf.size for leaf in jax.tree.leaves(run.params))
        assert float(row["tokens_per_s"]) > 0 and float(row["wall_s"]) > 0
    table = (workdir / "results.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| model.d_model")]
    assert len(body) == 2
    for line, d_model in zip(body, (16, 32)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        ppl = np.array([float(r["ppl"]) for r in rows if int(r["model.d_model"]) == d_model])
        assert cells[:2] == [str(d_model), "2"]
        assert cells[3] == sweep.format_spread(ppl.mean(), np.sqrt(((ppl - ppl.mean()) ** 2).sum() / (2 - 1)))
    assert (workdir / "ppl_vs_model.d_model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((workdir / "sweep.json").read_text())["seeds"] == SEEDS


def test_interrupted_sweep_skips_finished_points_and_resumes_the_cut_one(interrupted_sweep, tmp_path):
    workdir, names = interrupted_sweep["workdir"], interrupted_sweep["names"]
    assert interrupted_sweep["calls"] == names[2:]  # the finished points never reached train.run
    statuses = [line.split(": ")[1].split(",")[0] for line in interrupted_sweep["lines"]]
    assert statuses == ["skipped", "skipped", "resumed", "ran"]
    for name, mtimes in interrupted_sweep["finished"].items():
        assert {p: p.stat().st_mtime_ns for p in (workdir / name / "checkpoints").rglob("*")} == mtimes
    assert interrupted_sweep["rows"][2]["start_step"] == INTERRUPT_AT
    # The resumed job ends where an uninterrupted run of the same point and seed ends.
    reference = tmp_path / "uninterrupted"
    train.run(sweep.point_config(base_config(), interrupted_sweep["points"][1], SEEDS[0]), reference, quiet=True)
    resumed, straight = load_run(workdir / names[2]).params, load_run(reference).params
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)))


def test_a_changed_sweep_definition_in_the_same_folder_is_an_error(interrupted_sweep, monkeypatch):
    workdir = interrupted_sweep["workdir"]
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(ConfigError) as err:
        sweep.run_sweep(base_config(), [{"model.d_model": 16}, {"model.d_model": 48}], workdir, seeds=[0, 1, 2])
    assert "holds a different sweep" in str(err.value)
    assert "points: workdir has" in str(err.value)
    assert "seeds: workdir has [0, 1], config asks [0, 1, 2]" in str(err.value)
    changed = base_config()
    changed.train.steps = 6
    with pytest.raises(ConfigError, match=r"base_config\.train\.steps: workdir has 4, config asks 6"):
        sweep.run_sweep(changed, interrupted_sweep["points"], workdir, seeds=SEEDS)


# -- labelled points (an experiment's arms, each setting several keys) ------------------------------------------


def test_labels_name_the_sub_workdirs_instead_of_the_keys():
    points = [{"model.attention": "dense"}, {"model.attention": "topk", "model.attention_top_k": 2}]
    assert sweep.point_names(points, [0, 1], ["dense", "k2"]) == ["dense,seed=0", "dense,seed=1",
                                                                  "k2,seed=0", "k2,seed=1"]


@pytest.mark.parametrize("labels, message", [
    (["a"], "one label per point; got 1 labels for 2 points"),
    (["a", "a"], "labels must be distinct; repeated: a"),
    (["a", "x/y"], "label 'x/y' cannot name a folder"),
    (["a", ".."], "label '..' cannot name a folder"),
    (["a", ""], "label '' cannot name a folder"),
])
def test_bad_labels_are_errors_before_anything_is_made(labels, message, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(ConfigError) as err:
        sweep.run_sweep(base_config(), [{"model.d_model": 16}, {"model.d_model": 32}], tmp_path / "s", seeds=[0],
                        labels=labels)
    assert message in str(err.value)
    assert not (tmp_path / "s").exists()


def test_a_labelled_point_trains_into_its_named_folder_and_is_skipped_when_run_again(tmp_path):
    point = {"model.d_model": 16, "model.n_heads": 1}  # several keys in one point
    lines = []
    rows = sweep.run_sweep(base_config(), [point], tmp_path, seeds=[3], labels=["narrow"], echo=lines.append)
    run = load_run(tmp_path / "narrow,seed=3")
    assert rows[0]["name"] == "narrow,seed=3" and rows[0]["model.n_heads"] == 1
    assert (run.config.model.d_model, run.config.model.n_heads, run.config.train.seed) == (16, 1, 3)
    last_valid = [r for r in read_metrics(tmp_path / "narrow,seed=3") if r["split"] == "valid"][-1]
    assert rows[0]["loss"] == pytest.approx(last_valid["loss"])
    again = sweep.run_sweep(base_config(), [point], tmp_path, seeds=[3], labels=["narrow"], echo=lines.append)
    assert again == rows and lines[1].endswith("skipped, ppl " + f"{rows[0]['ppl']:.4g}")
    with pytest.raises(ConfigError, match="labels: workdir has \\['narrow'\\], config asks \\['thin'\\]"):
        sweep.run_sweep(base_config(), [point], tmp_path, seeds=[3], labels=["thin"])
