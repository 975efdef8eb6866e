import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from toyjax import train
from toyjax.metrics import MetricsWriter, drop_records_after, read_metrics, scalar_name
from toyjax.testing import tiny_config

# -- an independent reader of TensorBoard event files: TFRecord framing decoded by hand -------------------------


def crc32c(data: bytes) -> int:
    """Returns the CRC-32C (Castagnoli) of data, bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: Path) -> list[bytes]:
    """Returns the payloads of a TFRecord file: [8-byte length][4-byte crc of length][data][4-byte crc of data]."""
    blob, records, at = path.read_bytes(), [], 0
    while at < len(blob):
        header = blob[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", blob[at + 8:at + 12])[0] == masked_crc(header)
        data = blob[at + 12:at + 12 + length]
        assert struct.unpack("<I", blob[at + 12 + length:at + 16 + length])[0] == masked_crc(data)
        records.append(data)
        at += 16 + length
    return records


def event_scalars(workdir: Path) -> dict[str, dict[int, float]]:
    """Returns {tag: {step: value}} as TensorBoard shows it: files in name order, a restart's purge applied."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        for data in read_records(path):
            event = event_pb2.Event.FromString(data)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for steps in scalars.values():  # a restart at step s hides everything logged at s or later
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def assert_events_match_jsonl(workdir: Path) -> None:
    expected: dict[str, dict[int, float]] = {}
    for record in read_metrics(workdir):
        for key, value in record.items():
            if key not in ("step", "split"):
                expected.setdefault(scalar_name(record["split"], key), {})[record["step"]] = np.float32(value)
    assert expected and event_scalars(workdir) == expected


# -- tests -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.run(tiny_config(), workdir, quiet=True)
    return workdir


def test_event_files_hold_the_jsonl_metrics(uninterrupted):
    assert_events_match_jsonl(uninterrupted)
    tags = event_scalars(uninterrupted)
    assert {"train/loss", "valid/loss", "valid/ppl", "lr", "tokens_per_s"} <= tags.keys()
    assert sorted(tags["train/loss"]) == [2, 4, 6, 8] and sorted(tags["valid/ppl"]) == [4, 8]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_killed_and_resumed_run_logs_as_one_run(uninterrupted, tmp_path):
    cfg = tiny_config()  # logs every 2 steps, checkpoints every 4 and where a run stops
    train.run(cfg, tmp_path, quiet=True, until=5)  # checkpoint 5 lies inside a log interval
    train.run(cfg, tmp_path, quiet=True, until=7)  # logs steps 6 (train) ...
    shutil.rmtree(tmp_path / "checkpoints" / "7")  # ... then dies writing checkpoint 7: resumes from 5
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 7, "split": "tr')  # and in the middle of a line
    train.run(cfg, tmp_path, quiet=True)
    resumed, reference = read_metrics(tmp_path), read_metrics(uninterrupted)
    assert [(r["split"], r["step"]) for r in resumed] == [("train", 2), ("train", 4), ("valid", 4), ("train", 6),
                                                          ("train", 8), ("valid", 8)]
    assert without_timing(resumed) == without_timing(reference)  # bit-equal values, step 6 averaging steps 5 and 6
    assert_events_match_jsonl(tmp_path)


def test_reopening_at_a_restored_step_drops_later_records(tmp_path):
    with MetricsWriter(tmp_path) as metrics:
        for step in (2, 4, 6):
            metrics.write({"step": step, "split": "train", "loss": 1.0 / step})
    with MetricsWriter(tmp_path, restored_step=4) as metrics:
        metrics.write({"step": 6, "split": "train", "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(2, 0.5), (4, 0.25), (6, 0.5)]
    assert event_scalars(tmp_path)["train/loss"] == {2: 0.5, 4: 0.25, 6: 0.5}
    assert drop_records_after(tmp_path / "metrics.jsonl", 6) == 0
    assert drop_records_after(tmp_path / "metrics.jsonl", 3) == 2
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]
