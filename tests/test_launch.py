import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.data.n_stories=200", "--config.tokenizer.vocab_size=100", "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.max_len=16", "--config.train.steps=4",
        "--config.train.batch_size=4", "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
        "--config.train.n_samples=1", "--config.train.sample_length=6"]


def launch(*args):
    return subprocess.run([sys.executable, "launch.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_train_then_inspect_and_sample(tmp_path):
    out = launch("train", "--config", "experiments/configs/quickstart.py", "--workdir", tmp_path, "--quiet", *TINY)
    assert out.returncode == 0, out.stderr
    shown = launch("inspect", tmp_path, "--samples", "1")
    assert shown.returncode == 0, shown.stderr
    assert f"run {tmp_path} at step 4" in shown.stdout
    total = next(line for line in shown.stdout.splitlines() if line.strip().startswith("total"))
    # 1 layer, d=32, d_ff=512, vocab 100, 16 positions: count the parameters by hand.
    d, f, v, l = 32, 512, 100, 16
    expected = v * d + l * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d + 2 * d
    assert int(total.split()[1].replace(",", "")) == expected
    sampled = launch("sample", tmp_path, "--n", "2", "--prompt", "Lily had a", "--length", "12")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.count("Lily had a") == 2


def test_unknown_key_is_a_clear_error(tmp_path):
    out = launch("train", "--config", "experiments/configs/quickstart.py", "--workdir", tmp_path,
                 "--config.model.d_modle=3")
    assert out.returncode == 1
    assert "unknown config key 'model.d_modle'; did you mean 'model.d_model'?" in out.stderr


def test_bad_corpus_is_a_clear_error(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    out = launch("train", "--config", "experiments/configs/quickstart.py", "--workdir", tmp_path / "w",
                 f"--config.data.source={corpus}")
    assert out.returncode == 1 and f"corpus file {corpus} is empty" in out.stderr
