"""Training checkpoints: one Orbax `CheckpointManager` with three items per step.

    W/checkpoints/<step>/state      TrainState (params, buffers, optimizer state, step)
    W/checkpoints/<step>/data_iter  position of the input pipeline (JSON)
    W/checkpoints/<step>/meta       config, versions, process count, wall time (JSON)

Saves are asynchronous (training continues while arrays are written) and keep the last K.
Restoring goes into an abstract target that carries the *current* shardings, so a run saved
on one mesh resumes on another (8 devices -> 4 or 1, other process counts). The input
pipeline's position is a global batch index, independent of the number of processes.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sammed3d_jax.checkpoint import (
    CheckpointError,
    restore_error,
    silence_orphaned_reads,
)
from sammed3d_jax.train.step import TrainState

# Room asked for beyond a checkpoint's array bytes (metadata, file-system blocks).
SPACE_MARGIN = 1.1
SPACE_SLACK_BYTES = 1 << 20


def bytes_written_here(tree: Any) -> int:
    """Array bytes this process writes when `tree` is saved: its addressable shards of
    replica 0 (each replicated array is written once, by the process holding replica 0)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.replica_id == 0)
        elif hasattr(x, "nbytes"):
            total += int(x.nbytes)
    return total


class _OrbaxThreadErrors(logging.Filter):
    """Drop Orbax's logged tracebacks of a failed background save: the same error is raised
    in the training thread (as one line, `TrainCheckpointer`), after the save's threads
    have each logged it with its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("orbax" in record.pathname and "raised an exception" in str(record.msg))


_thread_filter = _OrbaxThreadErrors()


def _versions() -> dict[str, str]:
    import flax
    import optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": getattr(ocp, "__version__", "unknown"),
    }


class TrainCheckpointer:
    """Save / restore `TrainState` + data position + metadata under `workdir/checkpoints`."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        save_every: int,
        keep: int = 3,
        async_save: bool = True,
    ):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(int(save_every), 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter", "meta")
        )
        self._writing: int | None = None  # the step of the save started last
        silence_orphaned_reads()  # a failed write leaves the same orphans as a failed read
        for name in ("absl", "orbax"):
            if _thread_filter not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_thread_filter)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step)` would write a checkpoint without `force`."""
        return bool(self.manager.should_save(int(step)))

    def save(
        self,
        step: int,
        state: TrainState,
        data_position: dict[str, Any],
        meta: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        meta = {
            **meta,
            "step": int(step),
            "versions": _versions(),
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "saved_at": time.time(),
        }
        if not (force or self.manager.should_save(int(step))):
            return False
        self.wait()  # a failed earlier (asynchronous) save is reported as that step's
        self._check_space(int(step), state)
        try:
            started = self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data_iter=ocp.args.JsonSave(data_position),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=force,
            )
        except Exception as e:
            raise self._write_error(e, int(step)) from e
        if started:
            self._writing = int(step)
        return started

    def _check_space(self, step: int, state: TrainState) -> None:
        """Refuse a save the disk cannot hold, before writing anything (every process
        agrees, so all stop at the same step): a full disk would otherwise fail the save
        half-way in Orbax's background threads."""
        need = int(bytes_written_here(state) * SPACE_MARGIN) + SPACE_SLACK_BYTES
        free = shutil.disk_usage(self.directory).free
        short = np.int32(free < need)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            short = np.int32(np.max(multihost_utils.process_allgather(short)))
        if not short:
            return
        if free < need:
            where = f"needs about {need / 1e6:.0f} MB on this host, {free / 1e6:.0f} MB free"
        else:
            where = "another host has too little free space for its part (see its log)"
        raise CheckpointError(
            f"{self.directory}: no room for checkpoint step {step} ({where}); free some "
            f"space and run the same command again{self._resume_hint(step)}"
        )

    def _resume_hint(self, failed: int | None) -> str:
        done = [s for s in self.manager.all_steps() if s != failed]
        return f": it resumes from step {max(done)}" if done else ""

    def _write_error(self, error: BaseException, step: int | None = None) -> CheckpointError:
        """One line for a failed save: its step (`step`, else the save in flight) and the
        innermost reason Orbax gives."""
        failed = step if step is not None else self._writing
        self._writing = None
        where = self.directory / str(failed) if failed is not None else self.directory
        err = restore_error(where, "could not write the checkpoint", error)
        return CheckpointError(f"{err}{self._resume_hint(failed)}")

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, dict]:
        """Restore into `abstract_state` (ShapeDtypeStructs with the target shardings).

        Raises:
          CheckpointError: the step's files are damaged or do not fit the state; the
            message names the step's directory and the earlier steps one can resume from.
        """
        silence_orphaned_reads()
        try:
            out = self.manager.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data_iter=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types for damaged or mismatched files
            earlier = [s for s in self.manager.all_steps() if s < step]
            hint = (
                f"; move it aside to resume from step {max(earlier)}"
                if earlier
                else "; no earlier checkpoint to resume from"
            )
            err = restore_error(self.directory / str(step), "cannot restore the training state", e)
            raise CheckpointError(f"{err}{hint}") from e
        return out.state, dict(out.data_iter), dict(out.meta)

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from e
        self._writing = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_like(state: TrainState) -> TrainState:
    """ShapeDtypeStruct tree (with shardings) of a concrete state, for restoring into."""
    return jax.tree_util.tree_map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        state,
    )
