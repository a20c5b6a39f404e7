"""Training checkpoints: a disk too full for a save is one line naming the step and the step
to resume from, before anything is written or after Orbax's background write failed."""

from __future__ import annotations

import logging
from collections import namedtuple

import jax.numpy as jnp
import pytest

from sammed3d_jax.checkpoint import CheckpointError
from sammed3d_jax.train import checkpoint as ckpt_mod
from sammed3d_jax.train.checkpoint import TrainCheckpointer, bytes_written_here
from sammed3d_jax.train.step import TrainState


def small_state(step: int) -> TrainState:
    return TrainState(
        step=jnp.int32(step),
        params={"w": jnp.full((256, 256), float(step), jnp.float32)},
        rest={},
        opt_state={"mu": jnp.zeros((256, 256), jnp.float32)},
    )


def test_bytes_written_counts_each_array_once():
    assert bytes_written_here(small_state(0)) == 4 + 2 * 256 * 256 * 4


def test_save_without_room_stops_before_writing(tmp_path, monkeypatch):
    ckpt = TrainCheckpointer(tmp_path, save_every=1, keep=3, async_save=True)
    try:
        assert ckpt.save(1, small_state(1), {"batch_index": 1}, {})
        ckpt.wait()
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda _: usage(1 << 30, 0, 300_000))
        with pytest.raises(CheckpointError) as info:
            ckpt.save(2, small_state(2), {"batch_index": 2}, {})
        msg = str(info.value)
        assert msg.startswith(f"{tmp_path / 'checkpoints'}: no room for checkpoint step 2 (")
        assert "needs about 2 MB on this host, 0 MB free" in msg
        assert msg.endswith("run the same command again: it resumes from step 1")
        assert "\n" not in msg
        assert ckpt.manager.all_steps() == [1]
        assert not any(p.name.startswith("2") for p in (tmp_path / "checkpoints").iterdir())
    finally:
        monkeypatch.undo()
        ckpt.close()


def test_failed_background_write_is_one_line_naming_its_step(tmp_path, monkeypatch, caplog):
    ckpt = TrainCheckpointer(tmp_path, save_every=1, keep=3, async_save=True)
    reason = (
        'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "'
        + "x" * 500
        + "\": Failed to write 1529399 bytes to file 22: No space left on device [os_error_code='28']"
    )
    try:
        assert ckpt.save(1, small_state(1), {"batch_index": 1}, {})
        ckpt.wait()
        assert ckpt.save(2, small_state(2), {"batch_index": 2}, {})

        def failed_wait():
            raise ValueError(reason) from OSError(28, reason)

        monkeypatch.setattr(ckpt.manager, "wait_until_finished", failed_wait)
        with pytest.raises(CheckpointError) as info:
            ckpt.save(3, small_state(3), {"batch_index": 3}, {})
        msg = str(info.value)
        # The failure belongs to the save in flight (step 2), reported when the next starts.
        assert msg.startswith(f"{tmp_path / 'checkpoints' / '2'}: could not write the checkpoint: ")
        assert "No space left on device" in msg and "\n" not in msg and len(msg) < 600
        assert msg.endswith(": it resumes from step 1")
    finally:
        monkeypatch.undo()
        ckpt.close()

    # The traceback each of Orbax's writer threads logs for that failure is dropped; the
    # training thread's one line says it all. Other records pass.
    orbax_record = logging.LogRecord(
        "absl",
        logging.ERROR,
        "/x/orbax/checkpoint/_src/futures/future.py",
        387,
        "[process=0] _SignalingThread.run() raised an exception: %s",
        (reason,),
        None,
    )
    other = logging.LogRecord("absl", logging.ERROR, "/x/train.py", 1, "failed", (), None)
    assert not ckpt_mod._thread_filter.filter(orbax_record)
    assert ckpt_mod._thread_filter.filter(other)


def test_step_not_due_asks_nothing_of_the_disk(tmp_path, monkeypatch):
    ckpt = TrainCheckpointer(tmp_path, save_every=10, keep=3, async_save=False)
    assert ckpt.save(1, small_state(1), {}, {})  # the first step is always saved

    def no_disk(_):
        raise AssertionError("free space checked for a step that is not saved")

    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", no_disk)
    try:
        assert ckpt.save(3, small_state(3), {}, {}) is False
    finally:
        monkeypatch.undo()
        ckpt.close()
