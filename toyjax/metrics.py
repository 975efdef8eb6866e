"""A run's metrics, written twice: JSON lines (WORKDIR/metrics.jsonl) and TensorBoard event files (WORKDIR/events.*).

    with MetricsWriter(workdir, restored_step=step) as metrics:
        metrics.write({"step": 100, "split": "train", "loss": 2.31, "lr": 1e-3})

`tensorboard --logdir runs/` then shows every run under runs/ by its workdir name. Scalars are named
`split/key` (`train/loss`, `valid/ppl`); the learning rate and throughput keep their own names (`lr`,
`tokens_per_s`). A run killed after logging step 120 but resumed from its step-100 checkpoint would log
steps 101..120 twice; opening the writer at the restored step drops the later JSON lines (rewritten through a
temporary file, so a second kill cannot lose the file) and tells TensorBoard to hide the later events
(purge_step), so both read as one run.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from pathlib import Path

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
# Per-run quantities rather than per-split ones: shown under their own names.
UNSPLIT_KEYS = ("lr", "tokens_per_s")


def read_metrics(workdir: str | Path) -> list[dict]:
    """Returns the records of WORKDIR/metrics.jsonl in order ([] when there is none)."""
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in _complete_lines(path.read_text())] if path.is_file() else []


def _complete_lines(text: str) -> list[str]:
    # A line without its newline was cut short by a kill in the middle of a write: it is not a record.
    return [line for line in text.split("\n")[:-1] if line.strip()]


def drop_records_after(path: str | Path, step: int) -> int:
    """Returns how many records of a JSON-lines file had a step after `step`; rewrites the file without them."""
    path = Path(path)
    text = path.read_text()
    lines = _complete_lines(text)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines) and text.endswith("\n") or not text:
        return 0  # nothing to drop: leave the file alone
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)
    return len(lines) - len(kept)


def scalar_name(split: str, key: str) -> str:
    """Returns the TensorBoard tag of a record's key: `split/key`, or the key alone for UNSPLIT_KEYS."""
    return key if key in UNSPLIT_KEYS else f"{split}/{key}"


class MetricsWriter:
    """Appends records (dicts with 'step' and 'split') to metrics.jsonl and to TensorBoard event files."""

    def __init__(self, workdir: str | Path, *, restored_step: int | None = None):
        """restored_step: the step a resumed run restarts from, later records are dropped (None: a fresh run, all are)."""
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        # Without a restored step, records of an earlier attempt that never checkpointed are dropped too.
        after = restored_step if restored_step is not None else -1
        resuming = restored_step is not None or self.path.is_file()
        if self.path.is_file():
            drop_records_after(self.path, after)
        self.file = open(self.path, "a")
        # Each session gets its own event file; the nanosecond suffix keeps same-second sessions apart and in
        # order (TensorBoard reads a folder's event files sorted by name).
        self.tensorboard = SummaryWriter(logdir=str(self.workdir), flush_secs=30,
                                         purge_step=after + 1 if resuming else None,
                                         filename_suffix=f".{time.time_ns()}")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        split, step = record.get("split", "train"), int(record["step"])
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, numbers.Real):
                self.tensorboard.add_scalar(scalar_name(split, key), float(value), step)

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullMetricsWriter:
    """Takes records and writes nothing: the metrics writer of every process but the first in a multi-process run."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
