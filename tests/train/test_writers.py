"""Metric writer: metrics.jsonl truncation on resume and TensorBoard's purge of the points an
interrupted run logged after its last checkpoint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from sammed3d_jax.train.writers import METRICS_FILE, MetricWriter, window_metrics

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def read_events(path: Path) -> list:
    """Events of one TensorBoard event file (TFRecord framing: length, CRC, data, CRC)."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        ev = event_pb2.Event()
        ev.ParseFromString(data[i + 12 : i + 12 + n])
        out.append(ev)
        i += 12 + n + 4
    return out


def scalars(ev) -> list[tuple[str, float]]:
    return [(v.tag, v.simple_value) for v in ev.summary.value]


def test_resume_truncates_jsonl_and_purges_tensorboard(tmp_path):
    first = MetricWriter(tmp_path)
    for step in range(1, 6):
        first.write(step, {"train/loss": float(step)})
    first.close()  # the run "dies" after step 5; its last checkpoint was step 2

    resumed = MetricWriter(tmp_path)
    resumed.truncate_after(2)
    for step in (3, 4):
        resumed.write(step, {"train/loss": 10.0 + step})
    resumed.close()

    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)
    ]  # fmt: skip
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    events = [read_events(f) for f in files]
    old = [e for e in events if any(scalars(x) == [("train/loss", 5.0)] for x in e)]
    new = [e for e in events if e not in old]
    assert len(old) == 1 and len(new) == 1
    # The resumed run's file starts a session at step 3: TensorBoard drops the old file's
    # points from step 3 on (the duplicates of steps 3 and 4, and step 5).
    starts = [x for x in new[0] if x.HasField("session_log")]
    assert [(x.step, x.session_log.status) for x in starts] == [(3, event_pb2.SessionLog.START)]
    assert [(x.step, scalars(x)) for x in new[0] if x.summary.value] == [
        (3, [("train/loss", 13.0)]),
        (4, [("train/loss", 14.0)]),
    ]


def test_no_checkpoint_purges_everything(tmp_path):
    w = MetricWriter(tmp_path)
    w.truncate_after(-1)
    w.write(1, {"train/loss": 1.0})
    w.close()
    (f,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    starts = [x.step for x in read_events(f) if x.HasField("session_log")]
    assert starts == [0]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(tmp_path / "w", enabled=False)
    w.truncate_after(3)
    w.write(1, {"train/loss": 1.0})
    w.close()
    assert not (tmp_path / "w").exists()


def test_logged_line_summarises_the_steps_since_the_previous_one():
    rows = [
        {"loss": 4.0, "dice": 0.2, "lr/image_encoder": 1e-3, "param_norm": 10.0},
        {"loss": 2.0, "dice": 0.4, "lr/image_encoder": 5e-4, "param_norm": 11.0},
        {"loss": 3.0, "dice": 0.6, "lr/image_encoder": 2e-4, "param_norm": 12.0, "extra": 7.0},
    ]
    got = window_metrics(rows)
    assert got["loss"] == 3.0 and abs(got["dice"] - 0.4) < 1e-12  # means
    assert got["lr/image_encoder"] == 2e-4 and got["param_norm"] == 12.0  # the state reached
    assert got["extra"] == 7.0  # only where present
    assert window_metrics(rows[:1]) == rows[0]
    assert window_metrics([]) == {}
    # gradient accumulation over 2 micro-steps: only every second step updates
    accumulated = [{"update_norm": 0.0}, {"update_norm": 0.3}, {"update_norm": 0.0}]
    accumulated.append({"update_norm": 0.5})
    assert abs(window_metrics(accumulated)["update_norm"] - 0.4) < 1e-12
    assert window_metrics(accumulated[:1])["update_norm"] == 0.0
