"""`train_and_evaluate(config, workdir)`: the training loop behind `train.py`.

One process per host; every process runs the same loop. The mesh comes from `config.mesh`;
parameters and optimizer state are placed with their logical shardings directly (never whole
on one device); each process feeds its slice of the global batch
(`jax.make_array_from_process_local_data`); the step is `jax.jit` with explicit in/out
shardings and a donated state. Only process 0 writes logs and plots.

Resume order: the workdir's latest checkpoint, else `config.init_from`, else `config.seed`.
A SIGTERM (preemption) finishes the current step, saves, and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sammed3d_jax import sharding as sh
from sammed3d_jax.data.pipeline import DataConfig, make_eval_dataset, make_train_dataset
from sammed3d_jax.model.config import NUMERIC_FIELDS, Sam3DConfig
from sammed3d_jax.model.sam import abstract_sam3d, host_init
from sammed3d_jax.train.checkpoint import TrainCheckpointer, abstract_like
from sammed3d_jax.train.optim import OptimConfig, make_optimizer
from sammed3d_jax.train.step import TrainConfig, TrainState, make_eval_step, make_train_step
from sammed3d_jax.train.writers import MetricWriter, plot_curves

log = logging.getLogger("sammed3d_jax.train")


class NonFiniteError(FloatingPointError):
    """A logged training metric became NaN or infinite."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: saving a checkpoint after this step and stopping")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _dataclass_from(cls, values: Any, **extra: Any):
    values = dict(values.to_dict() if isinstance(values, ml_collections.ConfigDict) else values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields in config: {unknown}")
    values.update(extra)
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)


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
    return _dataclass_from(DataConfig, d)


def _initial_params(config, cfg: Sam3DConfig, abstract_state: nnx.State) -> tuple[dict, str]:
    """Pure-dict initial values (host numpy) and a description of where they came from."""
    if config.init_from:
        from sammed3d_jax.checkpoint import load_model

        numerics = {f: getattr(cfg, f) for f in NUMERIC_FIELDS}
        src = load_model(config.init_from, **numerics)
        loaded = src.config.replace(**numerics)
        if loaded != cfg:
            raise ValueError(
                f"init_from {config.init_from}: its architecture differs from config.model "
                f"({loaded} vs {cfg})"
            )
        return nnx.to_pure_dict(nnx.state(src)), f"init_from {config.init_from}"
    return host_init(nnx.to_pure_dict(abstract_state), config.seed), f"random (seed {config.seed})"


def _global_batch(local: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    out = {}
    for key, ndim in (("image", 4), ("label", 4), ("sample_mask", 1)):
        arr = local[key]
        out[key] = jax.make_array_from_process_local_data(sh.batch_sharding(mesh, ndim, rules), arr)
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


class Evaluator:
    """Held-out Dice after 1..N clicks (inference protocol), plus a prediction PNG."""

    def __init__(self, config, graphdef, mesh, rules, crop_size: int, state_shardings):
        v = config.val
        self.enabled = bool(v.root or v.records)
        if not self.enabled:
            return
        self.clicks = tuple(int(c) for c in v.clicks)
        batch = int(v.batch_size) or int(config.data.batch_size)
        data = dict(config.data.to_dict())
        data.update(
            root=v.root,
            records=v.records,
            tfds_dir="",  # held-out data come from val.root / val.records only
            splits=tuple(v.splits),
            flip_prob=0.0,
            eval_batch_size=batch,
            num_workers=0,
        )
        self.data_cfg = data_config(data, crop_size, batch)
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
            self._ds = make_eval_dataset(self.data_cfg)
        ds = self._ds
        dice, seen, first = [], 0, None
        for batch in ds:
            local = _local_arrays(batch)
            g = _global_batch(local, self.mesh, self.rules)
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
            seen += int(valid.sum())
            if seen >= self.max_items:
                break
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
    if addr:
        kwargs = dict(
            coordinator_address=addr,
            num_processes=int(dist.num_processes),
            process_id=int(dist.process_id),
        )
        if dist.local_device_ids:
            kwargs["local_device_ids"] = [int(x) for x in str(dist.local_device_ids).split(",")]
        jax.distributed.initialize(**kwargs)
        return
    env = os.environ
    cluster = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or ("TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", ""))
        or "JAX_COORDINATOR_ADDRESS" in env
        or ("OMPI_COMM_WORLD_SIZE" in env and int(env["OMPI_COMM_WORLD_SIZE"]) > 1)
    )
    if cluster:
        jax.distributed.initialize()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject values the loop cannot run with, naming the option (ValueError)."""
    for name in ("total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = config[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    clicks = tuple(config.val.clicks)
    if not clicks or any(not isinstance(c, int) or c < 1 for c in clicks):
        raise ValueError(f"val.clicks must be click counts >= 1, got {clicks!r}")


# What a checkpoint's arrays depend on: changing any of these cannot resume a run.
_STRUCTURE = (
    ("optim", "accumulation_steps"),
    ("optim", "grad_clip_norm"),
    ("freeze_image_encoder",),
)


def _structure(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in _STRUCTURE:
        value: Any = config
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if path[-1] == "grad_clip_norm":  # only on/off changes the optimizer state
            value = bool(value)
        out[".".join(path)] = value
    return out


def check_resumable(workdir: Path, config: ml_collections.ConfigDict, cfg: Sam3DConfig) -> None:
    """Raise ValueError if ``workdir`` holds checkpoints that ``config`` cannot resume."""
    saved = workdir / "config.json"
    steps = workdir / "checkpoints"
    if not saved.exists() or not steps.is_dir():
        return
    if not any(p.name.isdigit() for p in steps.iterdir()):
        return
    try:
        previous = json.loads(saved.read_text())
        previous_cfg = model_config(ml_collections.ConfigDict(previous))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{saved}: cannot read the saved run config: {e}") from e
    numerics = {f: getattr(cfg, f) for f in NUMERIC_FIELDS}
    diffs = [
        f"model.{f.name}: {getattr(previous_cfg, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if getattr(previous_cfg.replace(**numerics), f.name) != getattr(cfg, f.name)
    ]
    old, new = _structure(previous), _structure(config.to_dict())
    diffs += [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if old[k] != new[k]]
    if diffs:
        raise ValueError(
            f"--workdir {workdir} holds checkpoints of a run these settings cannot resume ("
            + "; ".join(diffs)
            + "); use a new --workdir, or init_from= the old run to start from its weights"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) according to `config` in `workdir`; returns the last metrics."""
    workdir = Path(workdir).absolute()
    check_config(config)
    cfg = model_config(config)
    check_resumable(workdir, config, cfg)
    maybe_initialize_distributed(config.distributed)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(workdir / "config.json", config.to_json_best_effort(indent=1) + "\n")
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
    train_cfg = _dataclass_from(TrainConfig, config.train)
    optim_cfg = _dataclass_from(
        OptimConfig, config.optim, freeze_image_encoder=bool(config.freeze_image_encoder)
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

    ckpt = TrainCheckpointer(
        workdir, config.checkpoint_every, config.keep_checkpoints, config.async_checkpointing
    )
    latest = ckpt.latest_step()

    with sh.use_mesh(mesh, rules):
        # Initial values are placed shard by shard; nothing is gathered on one device.
        if latest is None:
            pure, origin = _initial_params(config, cfg, nnx.state(abstract))
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
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        log.info("weights: %s", origin)
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

        ds = make_train_dataset(data_cfg, config.seed, start_batch=start_batch)
        it = iter(ds)
        writer = MetricWriter(workdir, enabled=is_main)
        if latest is not None:
            writer.truncate_after(latest)
        rng = jax.random.key(config.seed)
        total = int(config.total_steps)
        step = int(jax.device_get(state.step))
        step_at_start = step
        last = {}
        pbar = _progress(total, step, is_main)
        pending: list[tuple[int, Any]] = []
        t_log, wait, steps_since = time.time(), 0.0, 0
        profile = tuple(config.profile_steps) if config.profile_steps else ()

        def flush(force_eval: bool = False) -> None:
            nonlocal last, t_log, wait, steps_since
            for s, m in pending:
                host = {k: float(v) for k, v in jax.device_get(m).items()}
                bad = [k for k, v in host.items() if not math.isfinite(v)]
                if bad:
                    raise NonFiniteError(
                        f"step {s}: non-finite " + ", ".join(f"train/{k} = {host[k]}" for k in bad)
                    )
                last = {f"train/{k}": v for k, v in host.items()}
            pending.clear()
            dt = max(time.time() - t_log, 1e-9)
            last["perf/volumes_per_sec"] = steps_since * data_cfg.batch_size / dt
            last["perf/steps_per_sec"] = steps_since / dt
            last["perf/data_wait_fraction"] = wait / dt
            t_log, wait, steps_since = time.time(), 0.0, 0

        if evaluator.enabled and latest is None and step == 0:
            # The starting point, so the curves show what training changed.
            ev = evaluator(state, config.seed, None)
            writer.write(0, ev)
            log.info("step 0: %s", " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
        with _Preemption() as pre:
            while step < total:
                if profile and step == profile[0] and is_main:
                    jax.profiler.start_trace(str(workdir / "profile"))
                t0 = time.time()
                local = _local_arrays(next(it))
                wait += time.time() - t0
                batch = _global_batch(local, mesh, rules)
                state, metrics = step_fn(state, batch, rng)
                step += 1
                steps_since += 1
                pending.append((step, metrics))
                if profile and step == profile[-1] and is_main:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                if step % config.log_every == 0 or step == total or pre.requested:
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
                ckpt.save(
                    step,
                    state,
                    {"batch_index": start_batch + step - step_at_start},
                    {"config": json.loads(config.to_json_best_effort())},
                    force=pre.requested or step == total,
                )
                if evaluator.enabled and (step % config.eval_every == 0 or step == total):
                    png = workdir / "predictions.png" if is_main else None
                    ev = evaluator(state, config.seed, png)
                    writer.write(step, ev)
                    last.update(ev)
                    log.info("step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
                    if is_main:
                        plot_curves(workdir)
                if pre.requested:
                    log.warning("stopped at step %d after SIGTERM (checkpoint saved)", step)
                    break
        ckpt.close()
        if pbar is not None:
            pbar.close()
        if is_main:
            plot_curves(workdir)
        writer.close()
    return last


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
