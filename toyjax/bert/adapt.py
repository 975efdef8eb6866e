"""Masked-LM adaptation of a BERT (default: all-MiniLM-L6-v2, which ships without an MLM head) on a corpus, on CPU.

    python launch.py bert-adapt --corpus ../shared/corpora/tinystories_sample.txt --workdir runs/bert_adapt
    python -m toyjax.bert_adapt --corpus FILE --workdir DIR [--steps 1050 --time-budget-min 29.5 --mask-rate 0.4]

The whole encoder is trained; the MLM head (dense + GELU + LayerNorm, decoder tied to the word embeddings) is
created fresh when the base has none, its output bias set to the corpus's log piece frequencies so the first
steps are not spent learning unigram statistics. The loss is computed only at the masked positions (a fixed
number per row), which skips 60 % of the 30522-way softmax. 40 % of the pieces are masked rather than BERT's
15 %: on this budget it learns faster per step (held-out top-5 at step 300: 0.666 vs 0.630 at 25 %, 0.62 at
15 %; README). Runs resume from WORKDIR/checkpoints (orbax); WORKDIR/metrics.jsonl holds JSON lines and
WORKDIR/settings.json the run's settings; WORKDIR/hf is a Hugging Face folder (config.json, model.safetensors
with the head under HF names, vocab.txt, tokenizer.json) that toyjax.models.bert.load and
transformers.BertForMaskedLM.from_pretrained both read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from toyjax import probe
from toyjax.checkpoints import Checkpoints
from toyjax.config import ConfigError
from toyjax.data.text import CorpusError, read_text_file
from toyjax.metrics import MetricsWriter
from toyjax.models import bert as bert_lib
from toyjax.runs import differences

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def split_corpus(text: str, valid_fraction: float = 0.02) -> tuple[list[str], list[str]]:
    """Returns (train lines, held-out lines); a line is held out by a hash of its text, so splits are stable."""
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 4]
    held_out = lambda line: zlib.crc32(line.encode()) % 10_000 < valid_fraction * 10_000
    return [l for l in lines if not held_out(l)], [l for l in lines if held_out(l)]


def mlm_accuracy(bert, examples: probe.MaskedExamples, batch_size: int = 64, params=None) -> dict:
    """Returns {'top1', 'top5', 'n'} of the MLM head on masked single-piece words (probe.masked_word_examples)."""
    params = bert.params if params is None else params
    hits1 = hits5 = 0
    for start in range(0, len(examples), batch_size):
        sl = slice(start, start + batch_size)
        log_probs = np.asarray(bert._masked_log_probs(params, examples.ids[sl], examples.attention_mask[sl],
                                                      examples.positions[sl]))
        top5 = np.argsort(-log_probs, axis=-1)[:, :5]
        targets = examples.piece_targets[sl]
        hits1 += int((top5[:, 0] == targets).sum())
        hits5 += int((top5 == targets[:, None]).any(-1).sum())
    return {"top1": hits1 / len(examples), "top5": hits5 / len(examples), "n": len(examples)}


def _windows(bert, lines: list[str], seq_len: int) -> np.ndarray:
    """Returns [n_windows, seq_len] rows [CLS] pieces... [SEP] cut from the concatenated corpus."""
    stream = []
    for encoding in bert.piece_tokenizer.encode_batch(lines, add_special_tokens=False):
        stream.extend(encoding.ids + [bert.sep_id])
    body = seq_len - 2
    n = len(stream) // body
    pieces = np.array(stream[: n * body], np.int32).reshape(n, body)
    return np.concatenate([np.full((n, 1), bert.cls_id), pieces, np.full((n, 1), bert.sep_id)], 1).astype(np.int32)


def _masked_batch(windows, step, seed, batch_size, n_masked, mask_id, vocab_size):
    """Returns (inputs, positions [batch, n_masked], targets) for BERT's 80/10/10 masking; a function of step."""
    rng = np.random.default_rng([seed, step])
    rows = windows[rng.integers(0, len(windows), batch_size)]
    body = rows.shape[1] - 2
    positions = 1 + np.argsort(rng.random((batch_size, body)), axis=1)[:, :n_masked]
    targets = np.take_along_axis(rows, positions, 1)
    choice = rng.random(positions.shape)
    first_word_id = 1000 if vocab_size > 2000 else 5  # BERT: skip [unused*] and specials
    random_tokens = rng.integers(first_word_id, vocab_size, positions.shape)
    replacement = np.where(choice < 0.8, mask_id, np.where(choice < 0.9, random_tokens, targets))
    inputs = rows.copy()
    np.put_along_axis(inputs, positions, replacement, 1)
    return inputs, positions, targets


def _init_head(bert, windows, seed) -> dict:
    """Returns params with a fresh MLM head (HF init: normal(0.02), LayerNorm 1/0) whose bias is the log piece frequency."""
    full = bert_lib.BertModule(bert.config).init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))
    counts = np.bincount(windows.ravel(), minlength=bert.config.vocab_size) + 0.1
    params = dict(bert.params)
    hidden = bert.config.hidden_size
    params["mlm_dense"] = {"kernel": 0.02 * jax.random.normal(jax.random.PRNGKey(seed), (hidden, hidden)),
                           "bias": jnp.zeros((hidden,))}
    params["mlm_layer_norm"] = full["params"]["mlm_layer_norm"]
    params["mlm_bias"] = jnp.asarray(np.log(counts / counts.sum()), jnp.float32)
    return params


def save_hf_folder(bert, params, out_dir: Path, base_folder: Path) -> Path:
    """Writes config.json, model.safetensors (encoder + MLM head, HF names) and the tokenizer files."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(bert.config.to_hf_json(), indent=2))
    save_file(bert_lib.tensors_from_params(bert.config, params), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (Path(base_folder) / name).exists():
            shutil.copy(Path(base_folder) / name, out_dir / name)
    return out_dir


def adapt(corpus, workdir, *, base=None, steps: int = 1050, batch_size: int = 32, seq_len: int = 64,
          learning_rate: float = 3e-4, warmup_steps: int = 30, mask_rate: float = 0.4,
          time_budget_s: float | None = None, eval_every: int = 200, save_every: int = 100,
          n_eval: int = 1000, seed: int = 0) -> dict:
    """Returns final {'step', 'top1', 'top5', 'seconds', 'hf_folder'}; trains, checkpoints, resumes, exports."""
    if not 0 < mask_rate <= 1:
        raise ConfigError(f"mask_rate must be in (0, 1], got {mask_rate}")
    text = read_text_file(Path(corpus))  # empty, binary and non-UTF-8 files are a CorpusError naming the file
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bert = bert_lib.load(base)
    train_lines, valid_lines = split_corpus(text)
    windows = _windows(bert, train_lines, seq_len)
    eval_examples = probe.masked_word_examples(bert, probe.split_sentences(valid_lines), n_eval, seed=1)
    if not len(eval_examples) or not len(windows):
        raise CorpusError(f"{corpus}: too small to adapt on ({len(train_lines)} training lines, "
                         f"{len(eval_examples)} held-out masked words); give it more distinct lines of text")
    params = bert.params if bert.has_mlm_head else _init_head(bert, windows, seed)
    n_masked = max(1, round(mask_rate * (seq_len - 2)))
    settings = {"corpus": str(corpus), "base": str(bert.folder), "steps": steps, "batch_size": batch_size,
                "seq_len": seq_len, "learning_rate": learning_rate, "warmup_steps": warmup_steps,
                "mask_rate": mask_rate, "masked_per_row": n_masked, "seed": seed}
    _check_same_settings(workdir, settings)
    (workdir / "settings.json").write_text(json.dumps(settings, indent=1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(steps, warmup_steps + 1), learning_rate * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    module = bert_lib.BertModule(bert.config)

    def loss_fn(p, inputs, positions, targets):
        hidden = module.apply({"params": p}, inputs, jnp.ones_like(inputs), method="encode")[-1]
        at_masked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [batch, n_masked, hidden]
        logits = module.apply({"params": p}, at_masked, method="mlm_logits")
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train_step(state, inputs, positions, targets):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], inputs, positions, targets)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}, loss

    # The project's checkpoint helper: a damaged step is named and the previous one restores.
    checkpoints = Checkpoints(workdir / "checkpoints", keep=2)
    opt_state, step, restored_step = optimizer.init(params), 0, None
    if checkpoints.latest_step() is not None:
        step, params, opt_state, _ = checkpoints.restore(params_like=params, opt_state_like=opt_state)
        restored_step = step
        print(f"resumed from step {step}")
    state = {"params": params, "opt_state": opt_state, "step": jnp.array(step, jnp.int32)}
    # Records a killed run wrote after its last checkpoint are dropped, so the log reads as one run.
    log = MetricsWriter(workdir, restored_step=restored_step)
    elapsed_before = _previous_seconds(workdir / "metrics.jsonl")
    start = time.time()
    if step == 0:
        log.write({"step": 0, "split": "valid", **mlm_accuracy(bert, eval_examples, params=state["params"]), "seconds": 0.0})
    progress = tqdm(total=steps, initial=step, desc="bert-adapt")
    while step < steps and (time_budget_s is None or elapsed_before + time.time() - start < time_budget_s):
        inputs, positions, targets = _masked_batch(windows, step, seed, batch_size, n_masked, bert.mask_id, bert.config.vocab_size)
        state, loss = train_step(state, inputs, positions, targets)
        step += 1
        seconds = elapsed_before + time.time() - start
        progress.update(1)
        progress.set_postfix(loss=f"{float(loss):.3f}")
        log.write({"step": step, "split": "train", "loss": float(loss), "seconds": round(seconds, 1)})
        if step % save_every == 0:
            checkpoints.save(step, state["params"], state["opt_state"], {})
        if step % eval_every == 0:
            metrics = mlm_accuracy(bert, eval_examples, params=state["params"])
            log.write({"step": step, "split": "valid", **metrics, "seconds": round(seconds, 1)})
            progress.write(f"step {step}: held-out masked-word top-1 {metrics['top1']:.3f} top-5 {metrics['top5']:.3f}")
    progress.close()
    if checkpoints.latest_step() != step:
        checkpoints.save(step, state["params"], state["opt_state"], {})
    metrics = mlm_accuracy(bert, eval_examples, params=state["params"])
    seconds = elapsed_before + time.time() - start
    log.write({"step": step, "split": "valid", **metrics, "seconds": round(seconds, 1)})
    log.close()
    hf_folder = save_hf_folder(bert, state["params"], workdir / "hf", bert.folder)
    summary = {"step": step, **metrics, "seconds": round(seconds, 1), "hf_folder": str(hf_folder)}
    print(f"bert-adapt: step {step}, {seconds / 60:.1f} min, held-out masked-word top-1 {metrics['top1']:.3f} "
          f"top-5 {metrics['top5']:.3f} (n={metrics['n']}); wrote {hf_folder}")
    return summary


def _check_same_settings(workdir: Path, settings: dict) -> None:
    """Raises ConfigError listing the settings that differ from the ones WORKDIR/settings.json was written with."""
    path = workdir / "settings.json"
    if not path.is_file():
        return
    # steps may change (the schedule is stretched, as train.steps may); any other change makes another run.
    problems = [line for line in differences(json.loads(path.read_text()), settings) if not line.startswith("steps:")]
    if problems:
        raise ConfigError(f"{workdir} holds a bert-adapt run with other settings; use another --workdir or the same "
                          "settings:\n  " + "\n  ".join(problems))


def _previous_seconds(path: Path) -> float:
    """Returns the training seconds already logged in metrics.jsonl (so a time budget spans resumes)."""
    if not path.exists():
        return 0.0
    seconds = [json.loads(line).get("seconds", 0.0) for line in path.read_text().splitlines() if line.strip()]
    return max(seconds, default=0.0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="launch.py bert-adapt", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="UTF-8 text file")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--base", default=None, help="HF BERT folder (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=1050, help="length of the learning-rate schedule")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--mask-rate", type=float, default=0.4, help="fraction of pieces masked (80/10/10)")
    parser.add_argument("--time-budget-min", type=float, default=29.5,
                        help="stop after this much wall time, evaluation and checkpoints included")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return adapt(args.corpus, args.workdir, base=args.base, steps=args.steps, batch_size=args.batch_size,
                 seq_len=args.seq_len, learning_rate=args.learning_rate, mask_rate=args.mask_rate,
                 time_budget_s=args.time_budget_min * 60, eval_every=args.eval_every, save_every=args.save_every,
                 seed=args.seed)


if __name__ == "__main__":
    main()
