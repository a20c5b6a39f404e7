"""Metric output of a training run: JSON lines, TensorBoard events and PNG plots.

Only the main process (``jax.process_index() == 0``) writes. `W/metrics.jsonl` holds one
JSON object per logged step with `step` and namespaced keys (`train/loss`, `eval/dice_1`,
`perf/volumes_per_sec`, ...). Appends are flushed line by line, so a killed run keeps every
completed line, and a resumed run drops lines past the restored step before appending.

A logged line's training metrics summarise the steps since the previous line
(:func:`window_metrics`): means of the per-step values (loss, Dice, gradient norm, ...),
except those that describe the state reached (learning rates, parameter norm), which are the
last step's, and the update norm, averaged over the steps that applied an update (with
gradient accumulation, every k-th).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sammed3d_jax.files import atomic_path, write_atomic

METRICS_FILE = "metrics.jsonl"
# Training metrics that describe the state after a step rather than the step's batch.
LATEST_METRICS = ("lr/", "param_norm")
# Metrics of the optimizer updates: zero on the micro-steps of gradient accumulation that
# apply none, so they average over the steps that applied one.
UPDATE_METRICS = ("update_norm",)


def window_metrics(rows: list[Mapping[str, float]]) -> dict[str, float]:
    """One line's metrics from the per-step metrics since the previous line (oldest first).

    Means over the steps, except keys starting with an entry of `LATEST_METRICS`, which take
    the last step's value, and `UPDATE_METRICS`, averaged over the steps with a non-zero
    value (0 when none had one). Keys missing from some steps are averaged over the others.
    """
    if not rows:
        return {}
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [float(row[key]) for row in rows if key in row]
        if key.startswith(LATEST_METRICS):
            out[key] = values[-1]
            continue
        if key.startswith(UPDATE_METRICS):
            values = [v for v in values if v != 0.0] or [0.0]
        out[key] = math.fsum(values) / len(values)
    return out


def _to_python(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
        arr = np.asarray(v)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return v


class MetricWriter:
    """JSONL + TensorBoard writer that is a no-op on non-main processes."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        self._tensorboard = tensorboard
        self._purge_step: int | None = None
        self._file = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.workdir / METRICS_FILE, "a", buffering=1)

    def _tb_writer(self):
        """The TensorBoard writer, opened at the first scalar (after any `truncate_after`)."""
        if self._tb is None and self._tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard output is optional
                self._tensorboard = False
                return None
            # purge_step: TensorBoard hides the earlier event files' points from this step
            # on, i.e. what a run that died after its last checkpoint had logged.
            # A unique suffix: event files are named by the second and the host, and a
            # restart within the same second would otherwise overwrite the previous file.
            self._tb = SummaryWriter(
                str(self.workdir / "tensorboard"),
                flush_secs=30,
                purge_step=self._purge_step,
                filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}",
            )
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Drop logged lines with `step` greater than the given step (used on resume); in
        TensorBoard, points of earlier runs after `step` are hidden."""
        if not self.enabled:
            return
        self._purge_step = step + 1 if step >= 0 else 0
        if self._tb is not None:  # reopened at the next scalar, with the purge step
            self._tb.close()
            self._tb = None
        path = self.workdir / METRICS_FILE
        self._file.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        write_atomic(path, "".join(f"{x}\n" for x in kept))
        self._file = open(path, "a", buffering=1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            row[k] = _to_python(v)
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        tb = self._tb_writer()
        if tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(workdir: str | os.PathLike, out_name: str = "curves.png") -> Path | None:
    """Loss, Dice and validation-Dice curves from metrics.jsonl into a PNG (atomic write)."""
    rows = read_metrics(workdir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("train/loss", "training loss (sum over clicks)"),
        ("train/dice", "training Dice (last pass)"),
        ("eval/", "validation Dice"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, panels):
        keys = (
            sorted({k for r in rows for k in r if k.startswith(key)})
            if key.endswith("/")
            else [key]
        )
        keys = [k for k in keys if "dice" in k] if key == "eval/" else keys
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                s, v = zip(*pts)
                ax.plot(s, v, marker="o" if key == "eval/" else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if keys:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(workdir) / out_name
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out
