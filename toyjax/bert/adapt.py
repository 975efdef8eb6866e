"""Masked-LM adaptation of a BERT (default: all-MiniLM-L6-v2, which ships without an MLM head) on a corpus, on CPU.

    python launch.py bert-adapt --config experiments/configs/bert_adapt.py --workdir runs/bert_adapt \
        [--config.bert_adapt.mask_rate=0.25 ...]
    from toyjax.bert import adapt; adapt.run(config, workdir)     # config: toyjax.config.Config (its bert_adapt)

The whole encoder is trained; the MLM head (dense + GELU + LayerNorm, decoder tied to the word embeddings) is
created fresh when the base has none, its output bias set to the corpus's log piece frequencies so the first
steps are not spent learning unigram statistics. The loss is computed only at the masked positions (a fixed
number per row), which skips most of the 30522-way softmax. 40 % of the pieces are masked rather than BERT's
15 %: on this budget it learns faster per step (docs/experiments/bert.md). The workdir is laid out like a
training run's:

    WORKDIR/config.json     the full config; resuming with another bert_adapt section (steps and the time budget,
                            evaluation and checkpoint intervals aside) is an error listing the differences
    WORKDIR/checkpoints/    orbax steps (toyjax.checkpoints); a run resumes from the newest readable one
    WORKDIR/metrics.jsonl   train loss and held-out masked-word top-1 / top-5, also as TensorBoard events
    WORKDIR/hf/             a Hugging Face folder (config.json, model.safetensors with the head under HF names,
                            tokenizer files) that toyjax.bert.load and transformers.BertForMaskedLM both read
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from toyjax import config as config_lib
from toyjax.bert import heads
from toyjax.bert.hf import write_folder
from toyjax.bert.model import BertModule, init_params, load
from toyjax.checkpoints import Checkpoints
from toyjax.config import BertAdaptConfig, Config, ConfigError, validate
from toyjax.data.text import CorpusError, read_text_file
from toyjax.metrics import MetricsWriter, read_metrics
from toyjax.runs import differences

# bert_adapt keys that may change when a run resumes: how long and how often, not what is trained.
RESUMABLE_KEYS = ("steps", "time_budget_min", "eval_every", "save_every")


def split_corpus(text: str, valid_fraction: float = 0.02) -> tuple[list[str], list[str]]:
    """Returns (train lines, held-out lines); a line is held out by a hash of its text, so splits are stable."""
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 4]
    held_out = lambda line: zlib.crc32(line.encode()) % 10_000 < valid_fraction * 10_000
    return [l for l in lines if not held_out(l)], [l for l in lines if held_out(l)]


def mlm_accuracy(bert, examples: heads.MaskedExamples, batch_size: int = 64, params=None) -> dict:
    """Returns {'top1', 'top5', 'n'} of the MLM head on masked single-piece words (heads.masked_word_examples)."""
    hits1 = hits5 = 0
    for start in range(0, len(examples), batch_size):
        sl = slice(start, start + batch_size)
        log_probs = np.asarray(bert.masked_log_probs(examples.ids[sl], examples.attention_mask[sl],
                                                     examples.positions[sl], params=params))
        top5 = np.argsort(-log_probs, axis=-1)[:, :5]
        targets = examples.piece_targets[sl]
        hits1 += int((top5[:, 0] == targets).sum())
        hits5 += int((top5 == targets[:, None]).any(-1).sum())
    return {"top1": hits1 / len(examples), "top5": hits5 / len(examples), "n": len(examples)}


def corpus_windows(bert, lines: list[str], seq_len: int) -> np.ndarray:
    """Returns [n_windows, seq_len] rows [CLS] pieces... [SEP] cut from the concatenated corpus."""
    stream = []
    for encoding in bert.piece_tokenizer.encode_batch(lines, add_special_tokens=False):
        stream.extend(encoding.ids + [bert.sep_id])
    body = seq_len - 2
    n = len(stream) // body
    pieces = np.array(stream[: n * body], np.int32).reshape(n, body)
    return np.concatenate([np.full((n, 1), bert.cls_id), pieces, np.full((n, 1), bert.sep_id)], 1).astype(np.int32)


def masked_batch(windows, step, seed, batch_size, n_masked, mask_id, vocab_size):
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


def with_fresh_mlm_head(bert, windows, seed: int) -> dict:
    """Returns bert's params plus a fresh MLM head (HF init: normal(0.02), LayerNorm 1/0) whose bias is the log
    piece frequency of the windows."""
    counts = np.bincount(windows.ravel(), minlength=bert.config.vocab_size) + 0.1
    params = dict(bert.params)
    hidden = bert.config.hidden_size
    params["mlm_dense"] = {"kernel": 0.02 * jax.random.normal(jax.random.PRNGKey(seed), (hidden, hidden)),
                           "bias": jnp.zeros((hidden,))}
    params["mlm_layer_norm"] = init_params(bert.config, seed)["mlm_layer_norm"]
    params["mlm_bias"] = jnp.asarray(np.log(counts / counts.sum()), jnp.float32)
    return params


def check_config(cfg: BertAdaptConfig) -> None:
    """Raises ConfigError if the corpus or base-model folder named by the config cannot be used."""
    key = lambda name: f"bert_adapt.{name}"
    if not cfg.corpus:
        raise ConfigError(f"{key('corpus')} is required: set --config.bert_adapt.corpus=FILE (a UTF-8 text file)")
    if not Path(cfg.corpus).is_file():
        raise ConfigError(f"{key('corpus')}: file {cfg.corpus} does not exist (the TinyStories sample lives in "
                          "../shared/corpora); set --config.bert_adapt.corpus=FILE")
    if cfg.base and not (Path(cfg.base) / "config.json").is_file():
        raise ConfigError(f"{key('base')}: {cfg.base} is not a Hugging Face BERT folder (no config.json); "
                          "leave it empty for the packaged all-MiniLM-L6-v2")
    # Ranges (mask rate, steps, sizes, rates) are checked with every other config value in toyjax.config.validate.


def check_same_run(workdir: Path, config: Config) -> None:
    """Raises ConfigError listing the bert_adapt keys that differ from WORKDIR/config.json (RESUMABLE_KEYS aside)."""
    path = workdir / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text()).get("bert_adapt", {})
    wanted = dataclasses.asdict(config.bert_adapt)
    problems = [line for line in differences(saved, wanted, "bert_adapt.")
                if line.split(":")[0].removeprefix("bert_adapt.") not in RESUMABLE_KEYS]
    if problems:
        raise ConfigError(f"{workdir} holds a different bert-adapt run; use another --workdir or the same config:\n  "
                          + "\n  ".join(problems))


def run(config: Config, workdir) -> dict:
    """Returns final {'step', 'top1', 'top5', 'n', 'seconds', 'hf_folder'}; trains, checkpoints, resumes, exports.

    Everything that can be wrong with the config or the corpus is reported before the workdir is created.
    """
    cfg = validate(config).bert_adapt
    check_config(cfg)
    text = read_text_file(Path(cfg.corpus))  # empty, binary and non-UTF-8 files are a CorpusError naming the file
    try:
        bert = load(cfg.base or None)
    except (ValueError, ImportError) as err:
        raise ConfigError(f"bert_adapt.base: {err}") from None
    if cfg.seq_len > bert.config.max_position_embeddings:
        raise ConfigError(f"bert_adapt.seq_len={cfg.seq_len} exceeds the model's "
                          f"{bert.config.max_position_embeddings} positions")
    train_lines, valid_lines = split_corpus(text)
    windows = corpus_windows(bert, train_lines, cfg.seq_len)
    eval_examples = heads.masked_word_examples(bert, heads.split_sentences(valid_lines), cfg.n_eval, seed=1)
    if not len(eval_examples) or not len(windows):
        raise CorpusError(f"{cfg.corpus}: too small to adapt on ({len(train_lines)} training lines, "
                          f"{len(eval_examples)} held-out masked words); give it more distinct lines of text")
    workdir = Path(workdir).resolve()
    check_same_run(workdir, config)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save(config, workdir / "config.json")
    params = bert.params if bert.has_mlm_head else with_fresh_mlm_head(bert, windows, cfg.seed)
    n_masked = max(1, round(cfg.mask_rate * (cfg.seq_len - 2)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(cfg.steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    module = BertModule(bert.config)

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
    meta = {"bert_adapt": dataclasses.asdict(cfg)}
    opt_state, step, restored_step = optimizer.init(params), 0, None
    if checkpoints.latest_step() is not None:
        step, params, opt_state, _ = checkpoints.restore(params_like=params, opt_state_like=opt_state)
        restored_step = step
        print(f"resumed from step {step}")
    state = {"params": params, "opt_state": opt_state, "step": jnp.array(step, jnp.int32)}
    # Records a killed run wrote after its last checkpoint are dropped, so the log reads as one run.
    log = MetricsWriter(workdir, restored_step=restored_step)
    elapsed_before = max((r.get("seconds", 0.0) for r in read_metrics(workdir)), default=0.0)  # budget spans resumes
    budget_s = cfg.time_budget_min * 60 or None
    start = time.time()
    if step == 0:
        log.write({"step": 0, "split": "valid", **mlm_accuracy(bert, eval_examples, params=state["params"]), "seconds": 0.0})
    progress = tqdm(total=cfg.steps, initial=step, desc="bert-adapt")
    while step < cfg.steps and (budget_s is None or elapsed_before + time.time() - start < budget_s):
        inputs, positions, targets = masked_batch(windows, step, cfg.seed, cfg.batch_size, n_masked, bert.mask_id,
                                                  bert.config.vocab_size)
        state, loss = train_step(state, inputs, positions, targets)
        step += 1
        seconds = elapsed_before + time.time() - start
        progress.update(1)
        progress.set_postfix(loss=f"{float(loss):.3f}")
        log.write({"step": step, "split": "train", "loss": float(loss), "seconds": round(seconds, 1)})
        if step % cfg.save_every == 0:
            checkpoints.save(step, state["params"], state["opt_state"], meta)
        if step % cfg.eval_every == 0:
            metrics = mlm_accuracy(bert, eval_examples, params=state["params"])
            log.write({"step": step, "split": "valid", **metrics, "seconds": round(seconds, 1)})
            progress.write(f"step {step}: held-out masked-word top-1 {metrics['top1']:.3f} top-5 {metrics['top5']:.3f}")
    progress.close()
    if checkpoints.latest_step() != step:
        checkpoints.save(step, state["params"], state["opt_state"], meta)
    metrics = mlm_accuracy(bert, eval_examples, params=state["params"])
    seconds = elapsed_before + time.time() - start
    log.write({"step": step, "split": "valid", **metrics, "seconds": round(seconds, 1)})
    log.close()
    hf_folder = write_folder(bert.config, state["params"], workdir / "hf", bert.folder)
    summary = {"step": step, **metrics, "seconds": round(seconds, 1), "hf_folder": str(hf_folder)}
    print(f"bert-adapt: step {step}, {seconds / 60:.1f} min, held-out masked-word top-1 {metrics['top1']:.3f} "
          f"top-5 {metrics['top5']:.3f} (n={metrics['n']}); wrote {hf_folder}")
    return summary
