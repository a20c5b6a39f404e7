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

import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sammed3d_jax.checkpoint import (
    CheckpointError,
    restore_error,
    silence_orphaned_reads,
)
from sammed3d_jax.train.step import TrainState


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
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data_iter=ocp.args.JsonSave(data_position),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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
