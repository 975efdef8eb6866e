"""Every bad input through launch.py: one `error:` line naming what was wrong, the right exit status, no
traceback, and no workdir left behind when the run never started."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = "experiments/configs/quickstart.py"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained for 4 steps (max_len 16), for the `sample` cases."""
    from toyjax import train
    from toyjax.testing import tiny_config

    workdir = tmp_path_factory.mktemp("run")
    train.run(tiny_config(train={"steps": 4, "n_samples": 0}), workdir, quiet=True)
    return workdir


def train_args(workdir, *overrides):
    return ["train", "--config", QUICKSTART, "--workdir", workdir, "--quiet", *overrides]


def bad_inputs(work: Path, run: Path, tmp: Path) -> list[tuple[str, list, int, list[str]]]:
    """Returns (case, launch.py arguments, exit status, strings the error line must contain)."""
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "typo.py").write_text("from toyjax.config import Config\n\n\ndef get_config():\n"
                                 "    config = Config()\n    config.model.d_modle = 3\n    return config\n")
    return [
        ("unknown attention kind", train_args(work, "--config.model.attention=sparse"), 1,
         ["model.attention", "'sparse'", "dense", "topk"]),
        ("moe without experts", train_args(work, "--config.model.ffn=moe", "--config.model.moe.n_experts=0"), 1,
         ["model.moe.n_experts=0", ">= 1"]),
        ("top-k attention with k=0", train_args(work, "--config.model.attention=topk",
                                                "--config.model.attention_top_k=0"), 1,
         ["model.attention_top_k=0", ">= 1"]),
        ("heads do not divide d_model", train_args(work, "--config.model.n_heads=3"), 1,
         ["model.n_heads=3", "must divide model.d_model=128"]),
        ("zero context", train_args(work, "--config.model.max_len=0"), 1, ["model.max_len=0", ">= 2"]),
        ("vocabulary too small", train_args(work, "--config.tokenizer.vocab_size=2"), 1,
         ["tokenizer.vocab_size=2", ">= 8"]),
        ("unknown tokenizer kind", train_args(work, "--config.tokenizer.kind=bpe"), 1,
         ["tokenizer.kind='bpe'", "'topword', 'phrase'"]),
        ("valid-subset loss without a grammar", train_args(work, "--config.train.loss=valid_subset"), 1,
         ["train.loss='valid_subset'", "needs a grammar", "'structured', 'mixed'"]),
        ("negative steps", train_args(work, "--config.train.steps=-5"), 1, ["train.steps=-5", ">= 1"]),
        ("workdir is a file", train_args(tmp / "a_file"), 1, [str(tmp / "a_file"), "not a directory"]),
        ("unknown override key", train_args(work, "--config.model.d_modle=3"), 1,
         ["unknown config key 'model.d_modle'; did you mean 'model.d_model'?"]),
        ("unknown attribute in get_config()", ["train", "--config", tmp / "typo.py", "--workdir", work], 1,
         [f"{tmp / 'typo.py'}: unknown config key 'model.d_modle'; did you mean 'model.d_model'?"]),
        ("workdir inside a file", train_args(tmp / "a_file" / "run"), 1, [f"inside {tmp / 'a_file'}"]),
        ("missing config file", ["train", "--config", tmp / "missing.py", "--workdir", work], 1,
         [str(tmp / "missing.py"), "does not exist"]),
        ("unknown command", ["trian"], 2, ["unknown command 'trian'", "train, quickstart"]),
        ("missing argument", ["train", "--workdir", work], 2, ["--config"]),
        ("sample with top-p 0", ["sample", run, "--top-p", "0"], 1, ["top_p=0.0", "(0, 1]"]),
        ("sample longer than the context", ["sample", run, "--length", "999"], 1,
         ["length=999", "model.max_len=16"]),
        ("sample no rows", ["sample", run, "--n", "0"], 1, ["n=0", ">= 1"]),
        ("sample zero temperature", ["sample", run, "--temperature", "0"], 1, ["temperature=0.0", "> 0"]),
        ("sample negative top-k", ["sample", run, "--top-k", "-1"], 1, ["top_k=-1", ">= 0"]),
        ("sample of a missing run", ["sample", tmp / "no_run"], 1, [str(tmp / "no_run"), "not a toyjax run"]),
    ]


def launch(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_every_bad_input_is_one_error_line(trained_run, tmp_path):
    work = tmp_path / "work"
    cases = bad_inputs(work, trained_run, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    # Each case is a fresh interpreter (about 3 s of imports); two at a time halve the wall time.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(launch, [args for _, args, _, _ in cases]))
    failures = []
    for (case, args, status, needles), out in zip(cases, results):
        error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        problems = [f"exit status {out.returncode}, wanted {status}"] if out.returncode != status else []
        problems += ["a traceback"] if "Traceback" in out.stderr else []
        problems += [f"{len(error_lines)} 'error:' lines, wanted 1"] if len(error_lines) != 1 else []
        problems += [f"{needle!r} not named" for needle in needles if not any(needle in l for l in error_lines)]
        if problems:
            failures.append(f"{case} ({' '.join(map(str, args))}): {', '.join(problems)}\n{out.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert not work.exists(), "a run that never started left its workdir behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "a_file").read_text() == "not a directory\n"


def test_a_bad_config_is_reported_before_the_training_stack_is_imported():
    code = ("import sys, launch\n"
            "status = launch.main(['train', '--config', 'experiments/configs/quickstart.py', '--workdir', 'unused',\n"
            "                      '--config.model.n_heads=3'])\n"
            "print(status, sorted(m for m in ('toyjax.train', 'toyjax.checkpoints', 'optax', 'orbax.checkpoint')\n"
            "                     if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.split("\n")[0] == "1 []", out.stdout + out.stderr
    assert out.stderr.strip() == "error: model.n_heads=3 must divide model.d_model=128"
    assert not (ROOT / "unused").exists()
