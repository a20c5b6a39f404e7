"""`train_and_evaluate(config, workdir)`: the training loop behind `train.py`.

One process per host; every process runs the same loop. The mesh comes from `config.mesh`;
parameters and optimizer state are placed with their logical shardings directly (never whole
on one device); each process feeds its slice of the global batch
(`jax.make_array_from_process_local_data`); the step is `jax.jit` with explicit in/out
shardings and a donated state. Only process 0 writes logs and plots.

Resume order: the workdir's latest checkpoint, else `config.init_from`, else `config.seed`.
A SIGTERM (preemption) finishes the current step, saves, and raises `Preempted` (`train.py`
exits with code 143, so that schedulers and job controllers treat the run as unfinished and
start it again, which resumes it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sammed3d_jax import sharding as sh
from sammed3d_jax.checkpoint import PARAMS_DIR, require_utf8_path
from sammed3d_jax.data.layout import LayoutError
from sammed3d_jax.data.pipeline import (
    DataConfig,
    make_eval_dataset,
    make_train_dataset,
    open_source,
)
from sammed3d_jax.files import atomic_path, write_atomic
from sammed3d_jax.model.config import NUMERIC_FIELDS, Sam3DConfig
from sammed3d_jax.model.sam import abstract_sam3d, host_init
from sammed3d_jax.train.checkpoint import TrainCheckpointer, abstract_like
from sammed3d_jax.train.optim import OptimConfig, make_optimizer
from sammed3d_jax.train.step import TrainConfig, TrainState, make_eval_step, make_train_step
from sammed3d_jax.train.writers import MetricWriter, plot_curves, window_metrics

log = logging.getLogger("sammed3d_jax.train")


class NonFiniteError(FloatingPointError):
    """A logged training metric became NaN or infinite."""


class DataLostError(RuntimeError):
    """Several batches in a row had no readable sample: the training files are gone (an
    unmounted or deleted data folder) or unreadable."""


# Consecutive batches without one readable sample (on any process) that stop training.
MAX_UNREADABLE_BATCHES = 3


class _DataLossWatch:
    """Counts batches in a row in which some process read no sample, and stops the run at
    `MAX_UNREADABLE_BATCHES`.

    One process decides at once, before the step runs. Several processes must decide
    together: one that raised alone would leave the others waiting in the next step's
    collectives. They note each step's flag and compare them when the metrics are flushed
    (the same steps on every process), so all raise at the same step.
    """

    def __init__(self, source: str, processes: int):
        self.source, self.processes = source, processes
        self.streak, self.who = 0, set()
        self._flags: list[tuple[int, bool]] = []

    def step(self, step: int, local_mask: np.ndarray) -> None:
        empty = not bool(np.any(local_mask))
        if self.processes > 1:
            self._flags.append((step, empty))
        else:
            self.update(step, np.array([empty]))

    def agree(self) -> None:
        """Compare the flags noted since the last call across processes (collective)."""
        if self.processes == 1 or not self._flags:
            return
        from jax.experimental import multihost_utils

        steps = [s for s, _ in self._flags]
        local = np.array([e for _, e in self._flags], np.uint8)
        self._flags.clear()
        every = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(steps))
        for i, s in enumerate(steps):
            self.update(s, every[:, i].astype(bool))

    def update(self, step: int, empty: np.ndarray) -> None:
        """empty: (processes,) whether each process read no sample for `step`."""
        if not empty.any():
            self.streak, self.who = 0, set()
            return
        self.streak += 1
        self.who |= {int(p) for p in np.flatnonzero(empty)}
        if self.streak >= MAX_UNREADABLE_BATCHES:
            where = (
                f" on process(es) {sorted(self.who)} of {self.processes}"
                if self.processes > 1
                else ""
            )
            raise DataLostError(
                f"{self.source}: no readable sample in {self.streak} batches in a row{where} "
                f"at step {step} (files gone or unreadable; see the warnings above); the last "
                "checkpoint is kept"
            )


def _data_source(cfg: Any) -> str:
    """The config field and value the training data comes from, for messages."""
    for name in ("root", "records", "tfds_dir"):
        if getattr(cfg, name, None):
            return f"data.{name} {getattr(cfg, name)}"
    return "the training data"


class Preempted(Exception):
    """Training stopped after a SIGTERM with its state saved; running it again resumes."""

    def __init__(self, step: int, workdir: Path):
        super().__init__(f"stopped at step {step} after SIGTERM; checkpoint saved in {workdir}")
        self.step = step
        self.workdir = workdir


class _Preemption:
    """SIGTERM as a decision, taken at the same step on every process, to save and stop.

    One process: a Python signal handler sets a flag the loop reads after each step. Several
    processes: each may get the signal at a different moment, and one that stops to save
    while the others start the next step's collectives would hang them all; JAX's preemption
    service (which then owns SIGTERM) agrees on the first step every process can still
    reach, and `stop(step)` is true there on all of them.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        # (with the service switched off, each process falls back to its own handler)
        self.synced = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)

    def __enter__(self):
        if self.synced:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: saving a checkpoint after this step and stopping")

    def stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; call once per step on every process."""
        if self.synced:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = True
                log.warning("preemption notice: saving a checkpoint at step %d and stopping", step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _dataclass_from(cls, values: Any, section: str, **extra: Any):
    """``cls(**values)`` for the config section ``section``, whose name its errors carry."""
    values = dict(values.to_dict() if isinstance(values, ml_collections.ConfigDict) else values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields in config: {unknown}")
    values.update(extra)
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    try:
        return cls(**values)
    except ValueError as e:
        if str(e).startswith(f"{section}."):
            raise
        raise ValueError(f"{section}: {e}") from e


def model_config(config: ml_collections.ConfigDict) -> Sam3DConfig:
    m = dict(config.model.to_dict())
    variant = m.pop("variant")
    return Sam3DConfig.from_variant(variant, **m)


def data_config(d: Any, crop_size: int, batch_size: int | None = None) -> DataConfig:
    """``DataConfig`` of a config's data section; crops are the model's input size."""
    d = dict(d.to_dict() if isinstance(d, ml_collections.ConfigDict) else d)
    for key in ("root", "records", "tfds_dir"):
        if key in d and not d[key]:
            d[key] = None
    if d.get("crop_size") and int(d["crop_size"]) != crop_size:
        raise ValueError(
            f"data.crop_size={d['crop_size']} differs from the model's input size {crop_size} "
            "(set it to 0 or to the input size)"
        )
    d["crop_size"] = crop_size
    if batch_size:
        d["batch_size"] = batch_size
    return _dataclass_from(DataConfig, d, "data")


def _initial_params(config, cfg: Sam3DConfig, abstract_state: nnx.State) -> tuple[dict, str]:
    """Pure-dict initial values (host numpy) and a description of where they came from."""
    if config.init_from:
        from sammed3d_jax.checkpoint import load_model

        numerics = {f: getattr(cfg, f) for f in NUMERIC_FIELDS}
        src = load_model(config.init_from, **numerics)
        loaded = src.config.replace(**numerics)
        if loaded != cfg:
            differ = ", ".join(
                f"{f.name}={getattr(loaded, f.name)!r} (config.model: {getattr(cfg, f.name)!r})"
                for f in dataclasses.fields(cfg)
                if getattr(loaded, f.name) != getattr(cfg, f.name)
            )
            raise ValueError(
                f"init_from {config.init_from}: its architecture differs from config.model: "
                f"{differ}"
            )
        return nnx.to_pure_dict(nnx.state(src)), f"init_from {config.init_from}"
    return host_init(nnx.to_pure_dict(abstract_state), config.seed), f"random (seed {config.seed})"


def _global_batch(
    local: dict[str, np.ndarray], mesh, rules, batch_size: int
) -> dict[str, jax.Array]:
    out = {}
    for key, ndim in (("image", 4), ("label", 4), ("sample_mask", 1)):
        arr = local[key]
        out[key] = jax.make_array_from_process_local_data(
            sh.batch_sharding(mesh, ndim, rules), arr, (batch_size, *arr.shape[1:])
        )
    return out


def _local_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "image": np.asarray(batch["image"], np.float32),
        "label": np.asarray(batch["label"], np.uint8),
        "sample_mask": np.asarray(batch["valid"], bool),
    }


def save_prediction_png(path: Path, image, label, logits, points) -> None:
    """Three orthogonal slices through the first click: image, label and prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, label, pred = np.asarray(image), np.asarray(label) > 0, np.asarray(logits) > 0
    c = np.asarray(points)[0].astype(int)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, axis in zip(axes, range(3)):
        sl = [slice(None)] * 3
        sl[axis] = int(np.clip(c[axis], 0, image.shape[axis] - 1))
        ax.imshow(image[tuple(sl)].T, cmap="gray", origin="lower")
        ax.contour(label[tuple(sl)].T.astype(float), levels=[0.5], colors="lime", linewidths=1)
        ax.contour(pred[tuple(sl)].T.astype(float), levels=[0.5], colors="red", linewidths=1)
        rest = [a for a in range(3) if a != axis]
        ax.plot(c[rest[0]], c[rest[1]], "y+", ms=12)
        ax.set_title(f"axis A{axis} = {sl[axis]}  (green: label, red: prediction)")
        ax.axis("off")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)


def val_data_config(config: ml_collections.ConfigDict, crop_size: int) -> DataConfig:
    """The held-out data's settings: ``config.data``'s preparation (spacing, orientation, CT
    clamping), ``config.val``'s source, splits and batch size, no flips."""
    v = config.val
    batch = int(v.batch_size) or int(config.data.batch_size)
    data = dict(config.data.to_dict())
    data.update(
        root=v.root,
        records=v.records,
        tfds_dir="",  # held-out data come from val.root / val.records only
        # The training index's file would be rewritten by each (stale) for the other set.
        index_path="",
        splits=tuple(v.splits),
        flip_prob=0.0,
        # Every target is scored, as the inference protocol does; the "> 1000 voxels in
        # the crop" rule belongs to the original's training loader only.
        min_crop_voxels=1,
        eval_batch_size=batch,
        num_workers=0,
    )
    return data_config(data, crop_size, batch)


@contextlib.contextmanager
def _naming_the_source(section: str, cfg: DataConfig) -> Iterator[None]:
    """Dataset errors prefixed with the config field they come from (data.root, val.records,
    ...): the training and held-out sets may name the same kind of folder."""
    field = "records" if cfg.records else "tfds_dir" if cfg.tfds_dir else "root"
    try:
        yield
    except LayoutError as e:
        raise LayoutError(f"{section}.{field}: {e}") from e


class Evaluator:
    """Held-out Dice after 1..N clicks (inference protocol), plus a prediction PNG.

    The held-out items are prepared as the training items (``config.data``'s spacing,
    orientation and CT clamping, no flips), except that every target in ``min_volume_mm3``
    is scored however few of its voxels the crop holds.
    """

    def __init__(self, config, graphdef, mesh, rules, crop_size: int, state_shardings):
        v = config.val
        self.enabled = bool(v.root or v.records) and int(config.eval_every) > 0
        if not self.enabled:
            return
        self.clicks = tuple(int(c) for c in v.clicks)
        self.data_cfg = val_data_config(config, crop_size)
        self.global_batch = self.data_cfg.eval_batch_size or self.data_cfg.batch_size
        self.max_items = int(v.max_items)
        self._ds = None
        self.mesh, self.rules = mesh, rules
        step = make_eval_step(graphdef, max(self.clicks), return_predictions=True)
        repl = sh.replicated(mesh)
        self.step = jax.jit(
            step,
            in_shardings=(
                (state_shardings.params, state_shardings.rest),
                {k: sh.batch_sharding(mesh, 4, rules) for k in ("image", "label")},
                repl,
            ),
        )

    def __call__(self, state: TrainState, seed: int, png: Path | None) -> dict[str, float]:
        if self._ds is None:  # built once: its prepared-item cache lives across evaluations
            shard = sh.process_batch_shard(self.mesh, self.global_batch, self.rules)
            with _naming_the_source("val", self.data_cfg):
                self._ds = make_eval_dataset(self.data_cfg, *shard, max_items=self.max_items)
        ds = self._ds
        dice, first = [], None
        for batch in ds:
            local = _local_arrays(batch)
            g = _global_batch(local, self.mesh, self.rules, self.global_batch)
            out = self.step(
                (state.params, state.rest),
                {"image": g["image"], "label": g["label"]},
                jax.random.key(seed),
            )
            valid = np.asarray(
                jax.experimental.multihost_utils.process_allgather(g["sample_mask"], tiled=True)
            )
            d = np.asarray(
                jax.experimental.multihost_utils.process_allgather(
                    out["dice_per_click"], tiled=True
                )
            )
            dice.append(d[valid])
            if (
                first is None
                and png is not None
                and jax.process_index() == 0
                and local["sample_mask"][0]
            ):
                first = (
                    local["image"][0],
                    local["label"][0],
                    np.asarray(out["logits"].addressable_shards[0].data[0]),
                    np.asarray(out["points"].addressable_shards[0].data[0]),
                )
        if first is not None:
            save_prediction_png(png, *first)
        all_dice = np.concatenate(dice) if dice else np.zeros((0, max(self.clicks)))
        res = {"eval/num_items": float(len(all_dice))}
        for c in self.clicks:
            res[f"eval/dice_{c}"] = (
                float(np.nanmean(all_dice[:, c - 1])) if len(all_dice) else float("nan")
            )
        return res


def maybe_initialize_distributed(dist: Any) -> None:
    """`jax.distributed.initialize` from explicit settings or a detected cluster environment."""
    # Nothing here may touch the XLA backend before `initialize` (not even process_count).
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return
    addr = dist.coordinator_address
    # defaults (configs/common.py): num_processes 0, process_id -1 = not given
    if not addr and (int(dist.num_processes) > 0 or int(dist.process_id) >= 0):
        raise ValueError(
            "distributed.num_processes / process_id (--num_processes, --process_id) need "
            "distributed.coordinator_address (--coordinator_address) as well"
        )
    local: dict[str, Any] = {}
    if dist.local_device_ids:
        try:
            ids = [int(x) for x in str(dist.local_device_ids).split(",")]
        except ValueError:
            raise ValueError(
                "distributed.local_device_ids must be comma-separated device numbers, e.g. "
                f"0,1, got {dist.local_device_ids!r}"
            ) from None
        local["local_device_ids"] = ids
    if addr:
        # Unset counts (0 / -1) are left for JAX to detect from the cluster environment.
        jax.distributed.initialize(
            coordinator_address=addr,
            num_processes=int(dist.num_processes) if int(dist.num_processes) > 0 else None,
            process_id=int(dist.process_id) if int(dist.process_id) >= 0 else None,
            **local,
        )
        return
    env = os.environ
    cluster = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or ("TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", ""))
        or "JAX_COORDINATOR_ADDRESS" in env
        or ("OMPI_COMM_WORLD_SIZE" in env and int(env["OMPI_COMM_WORLD_SIZE"]) > 1)
    )
    if cluster:
        jax.distributed.initialize(**local)


COMPILATION_CACHE_DIR = "compilation_cache"  # the "auto" cache, inside the workdir


def use_compilation_cache(setting: str, workdir: str | os.PathLike) -> Path | None:
    """Point JAX's persistent compilation cache at the run's folder; returns it (None: off).

    A resumed or restarted run then loads its compiled training step instead of compiling
    it again (minutes for the GPU program). ``setting`` (``config.compilation_cache``):
    "auto" keeps a cache the environment already chose (``JAX_COMPILATION_CACHE_DIR``), else
    uses ``<workdir>/compilation_cache``; "" turns the cache off; anything else is the folder.
    Call it before anything is compiled in the process: JAX opens its cache once. Only
    process 0 writes entries (JAX's rule); every process reads them. The folder can be
    deleted at any time, which costs one compilation.
    """
    if not isinstance(setting, str):
        raise ValueError(f"compilation_cache must be a folder, 'auto' or '', got {setting!r}")
    if not setting:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if setting == "auto":
        chosen = jax.config.jax_compilation_cache_dir
        path = Path(chosen) if chosen else Path(workdir).absolute() / COMPILATION_CACHE_DIR
    else:
        check_local_path(setting, "compilation_cache")
        path = Path(setting).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"compilation_cache {path}: exists and is not a folder")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


class _CacheHits:
    """Counts JAX's persistent-cache hits while open (its monitoring events)."""

    EVENT = "/jax/compilation_cache/cache_hits"

    def __init__(self) -> None:
        self.hits = 0

    def _on_event(self, event: str, **_: Any) -> None:
        if event == self.EVENT:
            self.hits += 1

    def __enter__(self) -> _CacheHits:
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_listener(self._on_event)


def check_local_path(value: Any, name: str) -> None:
    """Reject URLs (gs://, s3://, ...): paths are read and written with the file system."""
    if value and "://" in str(value):
        raise ValueError(
            f"{name}={value}: URLs are not supported; mount the bucket (e.g. gcsfuse) and "
            "give its local path"
        )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject values the loop cannot run with, naming the option (ValueError)."""
    for name in ("total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = config[name]
        least = 0 if name == "eval_every" else 1  # eval_every = 0: no in-training evaluation
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    paths = {
        "data.root": config.data.root,
        "data.records": config.data.records,
        "data.tfds_dir": config.data.get("tfds_dir"),
        "val.root": config.val.root,
        "val.records": config.val.records,
        "init_from": config.init_from,
    }
    for name, value in paths.items():
        check_local_path(value, name)
    if not any(paths[k] for k in ("data.root", "data.records", "data.tfds_dir")):
        raise ValueError(
            "no training data: set data.root (a NIfTI dataset folder), data.records (prepared "
            "shards) or data.tfds_dir (a TFDS build); the shipped configs take data=... or "
            "records=... after their file name"
        )
    profile = tuple(config.get("profile_steps") or ())
    if profile and (
        len(profile) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in profile)
        or not 0 <= profile[0] < profile[1]
    ):
        raise ValueError(
            f"profile_steps must be () or two step numbers (start, stop) with "
            f"0 <= start < stop, got {profile!r}"
        )
    val_batch = config.val.get("batch_size", 0)
    if isinstance(val_batch, bool) or not isinstance(val_batch, int) or val_batch < 0:
        raise ValueError(
            f"val.batch_size must be an integer >= 0 (0: data.batch_size), got {val_batch!r}"
        )
    sh.rules_dict(config.get("sharding_rules"))  # a mistyped mesh axis is named here
    max_items = config.val.get("max_items", 0)
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 0:
        raise ValueError(
            f"val.max_items must be an integer >= 0 (0: every held-out item), got {max_items!r}"
        )
    clicks = tuple(config.val.clicks)
    if not clicks or any(not isinstance(c, int) or c < 1 for c in clicks):
        raise ValueError(f"val.clicks must be click counts >= 1, got {clicks!r}")
    group = config.train.get("normalization_group", 0) or 0
    bad_type = isinstance(group, bool) or not isinstance(group, int)
    if bad_type or group < 0 or (group and config.data.batch_size % group):
        raise ValueError(
            f"train.normalization_group={group!r} must be 0 (pool the whole batch) or a "
            f"divisor of data.batch_size={config.data.batch_size}"
        )
    accumulation = config.optim.get("accumulation_steps", 1)
    if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
        raise ValueError(f"optim.accumulation_steps must be an integer >= 1, got {accumulation!r}")
    updates = config.total_steps // accumulation
    if updates < 1:
        raise ValueError(
            f"total_steps={config.total_steps} < optim.accumulation_steps={accumulation}: the run "
            "would make no optimizer update"
        )
    if config.total_steps % accumulation:
        log.warning(
            "total_steps=%d is not a multiple of optim.accumulation_steps=%d: the last %d "
            "micro-batches are computed but never applied",
            config.total_steps,
            accumulation,
            config.total_steps % accumulation,
        )
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    schedule_steps = config.optim.get("total_steps")
    cosine = config.optim.get("schedule") == "warmup_cosine"
    if cosine and schedule_steps is not None and schedule_steps < updates:
        if not config.optim.get("min_lr_ratio", 0.0):
            raise ValueError(
                f"optim.total_steps={schedule_steps} ends the warmup_cosine schedule at "
                f"learning rate 0, but the run makes {updates} optimizer updates "
                f"(total_steps={config.total_steps} / accumulation_steps={accumulation}): "
                f"the last {updates - schedule_steps} would not train; set optim.total_steps="
                f"{updates} (a config's ':steps=N' argument sets both)"
            )
    if cosine and schedule_steps not in (None, updates):
        log.warning(
            "optim.total_steps=%s but the run makes %d optimizer updates (total_steps=%d / "
            "accumulation_steps=%d): the cosine schedule %s",
            schedule_steps,
            updates,
            config.total_steps,
            accumulation,
            "will not finish decaying" if schedule_steps > updates else "ends before the run",
        )
    milestones = tuple(config.optim.get("milestones") or ())
    if config.optim.get("schedule") == "multistep" and milestones:
        unreached = [m for m in milestones if m >= updates]
        if unreached:
            log.warning(
                "optim.milestones=%s counts optimizer updates, but the run makes %d "
                "(total_steps=%d / accumulation_steps=%d): the learning rate never decays at %s",
                milestones,
                updates,
                config.total_steps,
                accumulation,
                ", ".join(str(m) for m in unreached),
            )


# What a checkpoint's arrays and its data position depend on: changing any of these
# cannot resume a run (the position counts global batches of the seed's sample stream);
# nor can the grid the weights were trained to see (inference reads the run's spacing).
_STRUCTURE = (
    ("optim", "accumulation_steps"),
    ("optim", "grad_clip_norm"),
    ("freeze_image_encoder",),
    ("data", "batch_size"),
    ("seed",),
    ("data", "spacing"),
    ("data", "resample"),
    ("data", "canonical"),
)


def _structure(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in _STRUCTURE:
        value: Any = config
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if path[-1] == "grad_clip_norm":  # only on/off changes the optimizer state
            value = bool(value)
        if path[-1] == "spacing" and value is not None:  # JSON lists, config tuples, scalars
            value = tuple(float(v) for v in np.broadcast_to(np.asarray(value, float), (3,)))
        out[".".join(path)] = value
    return out


def _saved_run_config(workdir: Path) -> tuple[dict, Path] | None:
    """The config a workdir's checkpoints were saved with: from the newest checkpoint's
    metadata (what its arrays follow), else ``config.json``; None without checkpoints."""
    steps = workdir / "checkpoints"
    numbered = sorted(
        (int(p.name) for p in steps.iterdir() if p.name.isdigit()) if steps.is_dir() else (),
        reverse=True,
    )
    if not numbered:
        return None
    for step in numbered:
        meta = steps / str(step) / "meta" / "metadata"
        try:
            return dict(json.loads(meta.read_text())["config"]), meta
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unfinished or damaged: the restore decides about it
    saved = workdir / "config.json"
    if not saved.exists():
        return None
    try:
        return dict(json.loads(saved.read_text())), saved
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{saved}: cannot read the saved run config: {e}") from e


def check_workdir(workdir: Path) -> None:
    """Refuse a workdir the run would damage or that cannot be one (ValueError naming it):
    a file, a converted model checkpoint, or a folder whose ``config.json`` is not a
    training run's (a run writes its own over it)."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: is a file, not a folder")
    require_utf8_path(workdir.absolute(), "--workdir")
    for name in ("checkpoints", "tensorboard"):  # folders the run writes into
        if (workdir / name).exists() and not (workdir / name).is_dir():
            raise ValueError(f"--workdir {workdir}: {name} is a file where the run keeps a folder")
    if workdir.is_dir() and not os.access(workdir, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir {workdir}: cannot write in it")
    if (workdir / PARAMS_DIR).exists():
        raise ValueError(
            f"--workdir {workdir}: holds a converted model checkpoint ({PARAMS_DIR}/); train "
            f"in a new folder, with init_from={workdir} to start from its weights"
        )
    saved = workdir / "config.json"
    if saved.exists() and not (workdir / "checkpoints").is_dir():  # else: resume decides
        try:
            previous = json.loads(saved.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{saved}: not a training run's config ({e}); refusing to replace it"
            ) from e
        if not (isinstance(previous, dict) and {"model", "optim", "train"} <= previous.keys()):
            raise ValueError(f"{saved}: not a training run's config; refusing to replace it")


def check_resumable(workdir: Path, config: ml_collections.ConfigDict, cfg: Sam3DConfig) -> None:
    """Raise ValueError if ``workdir`` holds checkpoints that ``config`` cannot resume."""
    found = _saved_run_config(workdir)
    if found is None:
        return
    previous, saved = found
    try:
        previous_cfg = model_config(ml_collections.ConfigDict(previous))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{saved}: cannot read the saved run config: {e}") from e
    numerics = {f: getattr(cfg, f) for f in NUMERIC_FIELDS}
    diffs = [
        f"model.{f.name}: {getattr(previous_cfg, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if getattr(previous_cfg.replace(**numerics), f.name) != getattr(cfg, f.name)
    ]
    old, new = _structure(previous), _structure(config.to_dict())
    # (a field the saved config lacks is not compared)
    diffs += [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if old[k] not in (None, new[k])]
    if diffs:
        raise ValueError(
            f"--workdir {workdir} holds checkpoints of a run these settings cannot resume ("
            + "; ".join(diffs)
            + "); use a new --workdir, or init_from= the old run to start from its weights"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) according to `config` in `workdir`; returns the last metrics.

    Raises:
      Preempted: a SIGTERM stopped the run after saving (run it again to resume).
      NonFiniteError: a logged metric became NaN or infinite (nothing non-finite is saved).
      DataLostError: the training files became unreadable during the run.
    """
    check_local_path(os.fspath(workdir), "--workdir")
    if not os.fspath(workdir).strip():
        raise ValueError("--workdir is empty: give the folder for the run's checkpoints and logs")
    workdir = Path(workdir).absolute()
    check_workdir(workdir)
    check_config(config)
    # Before the model is built, so a mistyped folder costs no compile (and a wrong
    # held-out folder no training before the first evaluation).
    for name in ("data.root", "data.records", "data.tfds_dir", "val.root", "val.records"):
        value = config.get(name.split(".")[0]).get(name.split(".")[1])
        if value and not Path(value).exists():
            raise ValueError(f"{name} {value}: not found")
    cfg = model_config(config)
    check_resumable(workdir, config, cfg)
    maybe_initialize_distributed(config.distributed)
    is_main = jax.process_index() == 0
    with _workdir_lock(workdir, is_main):
        return _train_in(config, workdir, cfg, is_main)


@contextlib.contextmanager
def _workdir_lock(workdir: Path, is_main: bool) -> Iterator[None]:
    """One run per workdir: a second `train.py` started on a workdir in use (a restarted job
    while the old one still runs) would interleave checkpoints and metrics with it. The main
    process creates the workdir and holds an advisory lock on ``W/.lock`` for the run (file
    systems without locks are accepted as they are); every process learns whether it could,
    so a refusal stops all of them with the same message instead of leaving the others to
    time out in their first collective."""
    fh, refusal = None, None
    if is_main:
        try:
            fh = _lock_workdir(workdir)
        except ValueError as e:
            refusal = str(e)
    refused = refusal is not None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refused:
        raise ValueError(refusal or f"--workdir {workdir}: refused by process 0 (see its log)")
    try:
        yield
    finally:
        if fh is not None:
            fh.close()


def _lock_workdir(workdir: Path) -> Any:
    """Create ``workdir`` and lock its ``.lock`` file; returns the open file (the lock).

    Raises:
      ValueError: the folder cannot be created, or another run holds the lock.
    """
    import fcntl

    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from e
    path = workdir / ".lock"
    try:
        fh = open(path, "a+")  # held for the whole run
    except OSError as e:
        raise ValueError(f"--workdir {workdir}: cannot create {path.name} ({e.strerror})") from e
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().strip()
        fh.close()
        raise ValueError(
            f"--workdir {workdir}: another training run is using it"
            + (f" ({owner})" if owner else "")
            + "; stop it first or use another --workdir"
        ) from None
    except OSError as e:  # no locks on this file system
        log.warning("--workdir %s: cannot lock %s (%s); not checked", workdir, path, e)
    else:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
    return fh


def _train_in(
    config: ml_collections.ConfigDict, workdir: Path, cfg: Sam3DConfig, is_main: bool
) -> dict:
    log.info(
        "jax %s, process %d/%d, %d devices (%d local): %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
        jax.devices()[0].device_kind,
    )

    rules = sh.rules_dict(config.sharding_rules)
    mesh = sh.make_mesh(dict(config.mesh))
    log.info("mesh %s", dict(mesh.shape))
    tensor = mesh.shape["tensor"]
    uneven = [
        f"{name} ({heads})"
        for name, heads in (
            ("encoder heads", cfg.encoder_num_heads),
            ("decoder heads", cfg.decoder_num_heads),
        )
        if heads % tensor
    ]
    if uneven:  # logical_to_spec leaves such dimensions whole: no error, just no split
        log.warning(
            "mesh.tensor=%d does not divide the %s: those weights stay whole on every device "
            "of the tensor axis",
            tensor,
            " or the ".join(uneven),
        )
    train_cfg = _dataclass_from(TrainConfig, config.train, "train")
    optim_cfg = _dataclass_from(
        OptimConfig, config.optim, "optim", freeze_image_encoder=bool(config.freeze_image_encoder)
    )
    data_cfg = data_config(config.data, cfg.img_size)
    sh.check_batch_divisible(mesh, data_cfg.batch_size, "data.batch_size", rules)
    if config.val.root or config.val.records:
        val_batch = int(config.val.batch_size) or data_cfg.batch_size
        sh.check_batch_divisible(mesh, val_batch, "val.batch_size (or data.batch_size)", rules)

    abstract = abstract_sam3d(cfg)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    tx = make_optimizer(abstract_params, optim_cfg)
    param_sh = sh.state_shardings(abstract_params, mesh, rules)
    rest_sh = sh.state_shardings(abstract_rest, mesh, rules)

    initial = None
    if not (workdir / "checkpoints").is_dir():
        # A fresh run loads (and checks) its initial weights before the checkpoint folder is
        # made: a refused init_from leaves the workdir as it was.
        with sh.use_mesh(mesh, rules):
            initial = _initial_params(config, cfg, nnx.state(abstract))
    ckpt = TrainCheckpointer(
        workdir, config.checkpoint_every, config.keep_checkpoints, config.async_checkpointing
    )
    latest = ckpt.latest_step()
    if latest is not None and latest > int(config.total_steps):
        ckpt.close()
        raise ValueError(
            f"total_steps={config.total_steps} is below step {latest} of the checkpoint in "
            f"{workdir}: raise total_steps to continue, or use another --workdir"
        )

    with sh.use_mesh(mesh, rules):
        # Initial values are placed shard by shard; nothing is gathered on one device.
        if latest is None:
            pure, origin = initial or _initial_params(config, cfg, nnx.state(abstract))
        else:
            pure, origin = host_init(nnx.to_pure_dict(nnx.state(abstract)), 0), "checkpoint"
        full = nnx.state(abstract)
        nnx.replace_by_pure_dict(full, pure)
        params_host, rest_host = full.split(nnx.Param, ...)
        params = jax.device_put(params_host, param_sh)
        rest = jax.device_put(rest_host, rest_sh)
        opt_state = sh.init_optimizer_state(tx, params, param_sh, mesh)
        step0 = jax.device_put(np.zeros((), np.int32), sh.replicated(mesh))
        state = TrainState(step=step0, params=params, rest=rest, opt_state=opt_state)
        start_batch = 0
        if latest is not None:
            state, position, meta = ckpt.restore(latest, abstract_like(state))
            start_batch = int(position["batch_index"])
            origin = f"checkpoint step {latest} (saved by {meta.get('process_count')} process(es))"
            if config.init_from:
                log.warning(
                    "init_from %s is not used: the run resumes from its checkpoint step %d in "
                    "%s (a new --workdir starts from init_from)",
                    config.init_from,
                    latest,
                    workdir,
                )
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        log.info("weights: %s", origin)
        if is_main:  # once the run is set up: a failed start leaves no config behind
            write_atomic(workdir / "config.json", config.to_json_best_effort(indent=1) + "\n")
        log.info(
            "per-device bytes: params %.1f MB, optimizer %.1f MB; total params %.1f MB",
            sh.nbytes_per_device(state.params) / 1e6,
            sh.nbytes_per_device(state.opt_state) / 1e6,
            sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params)) / 1e6,
        )

        train_step = make_train_step(graphdef, tx, train_cfg, optim_cfg)
        batch_sh = {
            "image": sh.batch_sharding(mesh, 4, rules),
            "label": sh.batch_sharding(mesh, 4, rules),
            "sample_mask": sh.batch_sharding(mesh, 1, rules),
        }
        repl = sh.replicated(mesh)
        step_fn = jax.jit(
            train_step,
            in_shardings=(state_sh, batch_sh, repl),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        )
        evaluator = Evaluator(config, graphdef, mesh, rules, cfg.img_size, state_sh)

        shard = sh.process_batch_shard(mesh, data_cfg.batch_size, rules)
        with _naming_the_source("data", data_cfg):
            opened = open_source(data_cfg)
            ds = make_train_dataset(
                data_cfg, config.seed, *shard, start_batch=start_batch, opened=opened
            )
        num_items = len(opened[0])
        saved_items = position.get("num_items") if latest is not None else None
        if saved_items not in (None, num_items):
            # The stream is a function of (seed, batch index, item list): with other items
            # the resumed run samples anew, repeating some items and skipping others.
            log.warning(
                "%s: %d training items, %d when checkpoint step %d was saved: the resumed run "
                "does not continue the saved sample order",
                _data_source(data_cfg),
                num_items,
                saved_items,
                latest,
            )
        it = iter(ds)
        writer = MetricWriter(workdir, enabled=is_main)
        # Rows after the resumed step (or all rows when no checkpoint was reached) are
        # written again by this run; a torn last line goes with them.
        writer.truncate_after(latest if latest is not None else -1)
        rng = jax.random.key(config.seed)
        total = int(config.total_steps)
        step = int(jax.device_get(state.step))
        step_at_start = step
        last = {}
        pbar = _progress(total, step, is_main)
        pending: list[tuple[int, Any]] = []
        t_log, wait, steps_since = time.time(), 0.0, 0
        # A trace covers steps that this run makes: one resumed past its start is not traced.
        profile = tuple(config.profile_steps) if config.profile_steps else ()
        tracing = False

        def flush(force_eval: bool = False) -> None:
            nonlocal last, t_log, wait, steps_since
            data_loss.agree()
            rows = []
            for s, m in pending:
                host = {k: float(v) for k, v in jax.device_get(m).items()}
                bad = [k for k, v in host.items() if not math.isfinite(v)]
                if bad:
                    raise NonFiniteError(
                        f"step {s}: non-finite " + ", ".join(f"train/{k} = {host[k]}" for k in bad)
                    )
                rows.append(host)
            if rows:  # the steps since the previous line: means, lr and param_norm latest
                last = {f"train/{k}": v for k, v in window_metrics(rows).items()}
            pending.clear()
            dt = max(time.time() - t_log, 1e-9)
            last["perf/volumes_per_sec"] = steps_since * data_cfg.batch_size / dt
            last["perf/steps_per_sec"] = steps_since / dt
            last["perf/data_wait_fraction"] = wait / dt
            t_log, wait, steps_since = time.time(), 0.0, 0

        def evaluate(at: int, png: bool = True, plot: bool = True) -> None:
            nonlocal t_log
            started = time.time()
            ev = evaluator(
                state, config.seed, workdir / "predictions.png" if png and is_main else None
            )
            writer.write(at, ev)
            last.update(ev)
            log.info("step %d: %s", at, " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
            if plot and is_main and config.get("plot_every_eval", True):
                plot_curves(workdir)
            t_log += time.time() - started  # throughput windows leave evaluations out

        if evaluator.enabled and latest is None and step == 0:
            # The starting point, so the curves show what training changed.
            evaluate(0, png=False, plot=False)
        elif evaluator.enabled and latest is not None and meta.get("eval_pending"):
            evaluate(latest)  # deferred by the stop that saved this checkpoint
        data_loss = _DataLossWatch(_data_source(data_cfg), jax.process_count())
        with _Preemption() as pre, _closing(ckpt, writer):
            while step < total:
                if profile and step == profile[0] and is_main:
                    jax.profiler.start_trace(str(workdir / "profile"))
                    tracing = True
                t0 = time.time()
                local = _local_arrays(next(it))
                wait += time.time() - t0
                data_loss.step(step, local["sample_mask"])
                batch = _global_batch(local, mesh, rules, data_cfg.batch_size)
                if step == step_at_start:  # the first call compiles the step, or loads it
                    t_ready = time.time()
                    with _CacheHits() as cached:
                        state, metrics = step_fn(state, batch, rng)
                    log.info(
                        "train step %s in %.1f s",
                        "loaded from the compilation cache" if cached.hits else "compiled",
                        time.time() - t_ready,
                    )
                else:
                    state, metrics = step_fn(state, batch, rng)
                step += 1
                steps_since += 1
                pending.append((step, metrics))
                if tracing and step == profile[-1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    tracing = False
                stop = pre.stop(step)
                final = stop or step == total
                # Metrics are checked before any save: a non-finite state is never written
                # (it would push the last good checkpoint out of the kept ones).
                if step % config.log_every == 0 or final or ckpt.due(step):
                    flush()
                    writer.write(step, last)
                    if pbar is None and is_main:
                        log.info(
                            "step %d/%d loss %.4f dice %.4f lr %.2e %.2f volumes/s",
                            step,
                            total,
                            last["train/loss"],
                            last["train/dice"],
                            last.get("train/lr/image_encoder", float("nan")),
                            last["perf/volumes_per_sec"],
                        )
                    if pbar is not None:
                        pbar.set_postfix(
                            loss=f"{last['train/loss']:.3f}",
                            dice=f"{last['train/dice']:.3f}",
                            vps=f"{last['perf/volumes_per_sec']:.2f}",
                        )
                elif len(pending) > 4:
                    # Block every few steps: bounds the async queue of dispatched steps.
                    jax.block_until_ready(pending[-1][1])
                if pbar is not None:
                    pbar.update(1)
                position = {
                    "batch_index": start_batch + step - step_at_start,
                    "num_items": num_items,
                }
                eval_due = evaluator.enabled and (step % config.eval_every == 0 or step == total)
                # A stop before the last step leaves this evaluation to the resumed run (its
                # time would come out of the preemption's grace period, with the save still
                # being written); the checkpoint says so.
                defer_eval = eval_due and stop and step < total
                meta = {"config": json.loads(config.to_json_best_effort())}
                if defer_eval:
                    meta["eval_pending"] = True
                saved = ckpt.save(step, state, position, meta, force=final)
                if eval_due and not defer_eval:
                    evaluate(step)
                if pre.requested and not pre.synced and not saved:
                    # The signal came during the evaluation: save this step before stopping,
                    # its metrics checked and written first as for any save.
                    if pending:
                        flush()
                        writer.write(step, last)
                    saved = ckpt.save(step, state, position, meta, force=True)
                if pre.requested:
                    log.warning("stopped at step %d after SIGTERM (checkpoint saved)", step)
                    break
        if tracing:  # the run ended inside the profiled steps
            jax.profiler.stop_trace()
        if pbar is not None:
            pbar.close()
        if is_main:
            plot_curves(workdir)
    if pre.requested and step < total:  # a signal after the last step: the run is done
        raise Preempted(step, workdir)
    return last


@contextlib.contextmanager
def _closing(ckpt: TrainCheckpointer, writer: MetricWriter) -> Iterator[None]:
    """Finish pending (asynchronous) checkpoint writes and close the metric files on every
    exit, errors included: an interrupted async save would otherwise stay half-written."""
    try:
        yield
    finally:
        try:
            ckpt.close()
        finally:
            writer.close()


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # Only on a terminal; in log files the periodic log lines carry the same numbers.
    if not sys.stderr.isatty():
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
