"""Side-by-side benchmarks: this project vs the PyTorch original (medim's SAM-Med3D).

    python benchmarks/run.py --device cpu            # 2-core CPU, float32
    python benchmarks/run.py --device gpu            # one GPU, bfloat16 / fp16-autocast
    python benchmarks/run.py --device gpu --attention cudnn,einsum --train-variants \
        cudnn,cudnn+remat,einsum --torch-compile-batches 1,32   # variants side by side

Both sides run in one process on the same inputs with the same random weights (ours are
converted from the PyTorch model's state dict). Warm-up (compilation) is excluded; every figure
is the median of repeated runs. The last line printed is one JSON object with a stable key per
figure for both sides (`encoder_b1_ms` / `torch_encoder_b1_ms`, ...) and their ratios.
Main keys are for the first `--attention` / `--train-variants` entry; the others appear as
`encoder_<variant>_b<B>_ms` and `train_<variant>_*` ('+' written '_': `encoder_cudnn_tanh_b1_ms`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENCODER_GFLOP_EXACT = 104.0  # per 128³ volume with the exact windowed attention

# The performance issue's targets: ratio key -> (bound, "lower" / "higher" is better).
# Time ratios are ours / the original's (lower is better), throughput and memory ratios
# likewise ours / the original's (throughput: higher is better).
TARGETS = {
    "cpu": {"ratio_encoder_b1": (0.05, "lower")},
    "gpu": {
        "ratio_encoder_b1_vs_compiled": (0.2, "lower"),
        "ratio_encoder_best_throughput_vs_compiled": (17.0, "higher"),
        "ratio_click_b1": (1 / 7, "lower"),
        "ratio_train_throughput": (20.0, "higher"),
        "ratio_train_peak_memory": (0.25, "lower"),
    },
}

# Dense bfloat16 tensor-core peaks (TFLOP/s, vendor data sheets) for the spec-based MFU.
SPEC_BF16_TFLOPS = {
    "NVIDIA H200": 989.4,
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
}


def target_report(result: dict[str, Any], device: str) -> dict[str, dict[str, Any]]:
    """Each of the device's targets that the run measured: value, bound, direction, met."""
    out = {}
    for key, (bound, better) in TARGETS[device].items():
        if isinstance(result.get(key), (int, float)):
            value = result[key]
            met = value <= bound if better == "lower" else value >= bound
            out[key] = {"value": value, "target": bound, "better": better, "met": bool(met)}
    return out


def median_time(fn, repeats: int, sync=lambda out: out) -> float:
    """Median wall time (s) of `fn()` over `repeats` runs after one warm-up run."""
    sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, tuple[Any, Any]], repeats: int, errors: dict[str, str] | None = None
) -> dict[str, float]:
    """Median wall time (s) of each ``fn()`` (synced by its ``sync``), measured round-robin:
    one warm-up run each, then `repeats` rounds that run every function once. On a shared,
    noisy machine both sides of a ratio then see the same slow spells.

    With ``errors`` given, a function whose warm-up raises (e.g. one side out of memory at a
    large batch) is recorded there as ``"Type: message"`` and left out; the others are timed.
    """
    fns = dict(fns)
    for name, (fn, sync) in list(fns.items()):
        try:
            sync(fn())
        except Exception as e:
            if errors is None:
                raise
            errors[name] = f"{type(e).__name__}: {e}"[:500]
            del fns[name]
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (fn, sync) in fns.items():
            t0 = time.perf_counter()
            sync(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def device_info(jax_mod, torch_mod) -> dict[str, Any]:
    d = jax_mod.devices()[0]
    info = {
        "jax_device": f"{d.platform}:{getattr(d, 'device_kind', '')}",
        "jax": jax_mod.__version__,
        "torch": torch_mod.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if torch_mod.cuda.is_available():
        info["torch_device"] = torch_mod.cuda.get_device_name(0)
    info["cpu_model"] = cpu_model()
    info["torch_threads"] = torch_mod.get_num_threads()
    return info


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host CPU's model name with its family/model/stepping numbers (machines of one
    name differ by generation: AMD EPYC family 25 is Zen 3/4, family 26 Zen 5)."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    ids = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    return f"{name} ({', '.join(ids)})" if ids else name


def with_config(ours, **changes):
    """A model of ``ours.config.replace(**changes)`` sharing ours' weights (no random init:
    eager initialisation compiles one kernel per parameter, tens of seconds on a GPU)."""
    from flax import nnx

    from sammed3d_jax.model.sam import abstract_sam3d

    model = abstract_sam3d(ours.config.replace(**changes))
    nnx.update(model, nnx.state(ours))
    return model


# Variant flags that change the model's numerics (see Sam3DConfig), and the training ones.
MODEL_FLAGS = {"tanh": {"gelu": "tanh"}, "exact": {"gelu": "exact"}}
TRAIN_FLAGS = ("remat", "unroll", "scan")


def parse_variant(variant: str, train: bool = False) -> tuple[dict[str, Any], set[str]]:
    """'IMPL[+flag...]' -> (model config changes, training flags). Model flags: exact / tanh
    (the encoder GELU's form; default "auto": tanh in bfloat16); training flags: remat
    (encoder rematerialisation), unroll / scan (the click loop unrolled or a device loop;
    default: TrainConfig's "auto", unrolled on GPUs)."""
    impl, *flags = variant.split("+")
    changes: dict[str, Any] = {"attention_impl": impl}
    train_flags = set()
    for flag in flags:
        if flag in MODEL_FLAGS:
            changes.update(MODEL_FLAGS[flag])
        elif train and flag in TRAIN_FLAGS:
            train_flags.add(flag)
            if flag == "remat":
                changes["remat"] = True
        else:
            known = sorted(MODEL_FLAGS) + (list(TRAIN_FLAGS) if train else [])
            raise ValueError(f"variant {variant!r}: unknown flag {flag!r} (known: {known})")
    if {"unroll", "scan"} <= train_flags:
        raise ValueError(f"variant {variant!r}: unroll and scan exclude each other")
    return changes, train_flags


def variant_key(variant: str) -> str:
    return variant.replace("+", "_")


def encoder_variants(ours, variants: list[str]) -> dict[str, Any]:
    """The same weights under each variant ('cudnn', 'cudnn+tanh', ...), as `split_flat`
    pairs."""
    from sammed3d_jax.model.sam import compute_dtype_weights, split_flat

    out = {}
    for variant in variants:
        changes, _ = parse_variant(variant)
        same = all(getattr(ours.config, k) == v for k, v in changes.items())
        model = ours if same else with_config(ours, **changes)
        out[variant] = split_flat(compute_dtype_weights(model))  # as the inference engine
    return out


def bench_encoder(
    variants,
    ref,
    batches,
    repeats,
    gpu,
    compile_batches,
    compile_modes=("default",),
    report=lambda d: None,
) -> dict[str, float]:
    """Encoder latency / throughput by batch, ours and the original round-robin; `report`
    gets the figures after each batch, so a run cut short keeps them."""
    import jax
    import torch

    from sammed3d_jax.model.sam import merge_flat

    out: dict[str, float] = {}
    compiled = {
        mode: torch.compile(
            ref.image_encoder, dynamic=False, mode=None if mode == "default" else mode
        )
        for mode in (compile_modes if compile_batches else ())
    }
    impls = list(variants)
    fns = {}
    for impl, (flatdef, leaves) in variants.items():

        @jax.jit
        def encode(leaves, x, flatdef=flatdef):
            return merge_flat(flatdef, leaves).encode(x)

        fns[impl] = (encode, leaves)
    for b in batches:
        try:
            _encoder_batch(out, fns, impls, b, ref, repeats, gpu, compiled, compile_batches)
        except Exception as e:  # e.g. out of memory at a large batch: keep the others
            out[f"encoder_b{b}_error"] = f"{type(e).__name__}: {e}"[:500]
            if gpu:
                torch.cuda.empty_cache()
        report(out)
    return out


def _encoder_batch(out, fns, impls, b, ref, repeats, gpu, compiled, compile_batches) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    dev = "cuda" if gpu else "cpu"
    x = np.random.default_rng(b).standard_normal((b, 128, 128, 128), np.float32)
    # Held in a dict so that the closures below let go of them when it is cleared.
    inputs = {"jax": jax.device_put(jnp.asarray(x)), "torch": torch.from_numpy(x[:, None]).to(dev)}

    def torch_sync(o):
        if gpu:
            torch.cuda.synchronize()
        return o

    def under_autocast(fn):
        def run():
            with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=gpu):
                return fn(inputs["torch"])

        return run

    timed = {
        impl: (lambda f=encode, s=state: f(s, inputs["jax"]), jax.block_until_ready)
        for impl, (encode, state) in fns.items()
    }
    timed["torch"] = (under_autocast(ref.image_encoder), torch_sync)
    if b in compile_batches:
        for mode, fn in compiled.items():
            timed[f"torch_compiled_{mode}"] = (under_autocast(fn), torch_sync)
    errors: dict[str, str] = {}
    times = interleaved_medians(timed, repeats, errors)
    if errors and gpu:
        torch.cuda.empty_cache()
    for i, impl in enumerate(impls):
        key = f"encoder_b{b}" if i == 0 else f"encoder_{variant_key(impl)}_b{b}"
        if impl in errors:  # one side failing keeps the other side's figures
            out[f"{key}_error"] = errors[impl]
            continue
        out[f"{key}_ms"] = 1e3 * times[impl]
        out[f"{key}_volumes_per_sec"] = b / times[impl]
    if "torch" in times:
        out[f"torch_encoder_b{b}_ms"] = 1e3 * times["torch"]
        out[f"torch_encoder_b{b}_volumes_per_sec"] = b / times["torch"]
    else:
        out[f"torch_encoder_b{b}_error"] = errors["torch"]
    for mode in compiled:
        if f"torch_compiled_{mode}" in errors:
            out[f"torch_compiled_{mode.replace('-', '_')}_encoder_b{b}_error"] = errors[
                f"torch_compiled_{mode}"
            ]
    modes = [m for m in compiled if f"torch_compiled_{m}" in times]
    for mode in modes:
        out[f"torch_compiled_{mode.replace('-', '_')}_encoder_b{b}_ms"] = (
            1e3 * times[f"torch_compiled_{mode}"]
        )
    if modes:  # the main compiled figure: the fastest mode
        best = min(modes, key=lambda m: times[f"torch_compiled_{m}"])
        out[f"torch_compiled_encoder_b{b}_ms"] = 1e3 * times[f"torch_compiled_{best}"]
        out[f"torch_compiled_encoder_b{b}_volumes_per_sec"] = b / times[f"torch_compiled_{best}"]
        out[f"torch_compiled_encoder_b{b}_mode"] = best
    inputs.clear()
    if gpu:
        torch.cuda.empty_cache()
    if f"encoder_b{b}_ms" not in out:
        return
    t = out[f"encoder_b{b}_ms"]
    if "torch" in times:
        out[f"ratio_encoder_b{b}"] = t / out[f"torch_encoder_b{b}_ms"]
    if f"torch_compiled_encoder_b{b}_ms" in out:
        out[f"ratio_encoder_b{b}_vs_compiled"] = t / out[f"torch_compiled_encoder_b{b}_ms"]


def encoder_accuracy(variants, ours_fp32_state, batch: int = 1) -> dict[str, float]:
    """Relative max error of each variant's embedding against float32 at highest precision."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sammed3d_jax.model.sam import merge_flat

    flatdef32, leaves32 = ours_fp32_state
    x = jnp.asarray(np.random.default_rng(99).standard_normal((batch, 128, 128, 128), np.float32))
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda s, x: merge_flat(flatdef32, s).encode(x))(leaves32, x)
    scale = float(jnp.max(jnp.abs(ref)))
    out = {}
    for impl, (flatdef, leaves) in variants.items():
        emb = jax.jit(lambda s, x, g=flatdef: merge_flat(g, s).encode(x))(leaves, x)
        err = float(jnp.max(jnp.abs(emb.astype(jnp.float32) - ref))) / scale
        out[f"accuracy_encoder_{variant_key(impl)}_max_rel_vs_fp32"] = err
    return out


def bench_click(ours, ref, repeats, gpu) -> dict[str, float]:
    """One click: prompt encoder + mask decoder + upsampling to 128³ (embedding precomputed)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sammed3d_jax.model.common import upsample_logits
    from sammed3d_jax.model.sam import compute_dtype_weights, merge_flat, split_flat

    flatdef, state = split_flat(compute_dtype_weights(ours))  # as the inference engine

    @jax.jit
    def click(state, emb, pts, lab, mask):
        m = merge_flat(flatdef, state)
        out = m.decode(emb, pts, lab, mask)
        return upsample_logits(out.low_res_logits, 128)

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 8, 8, 8, 384)).astype(np.float32)
    pts = rng.uniform(0, 127, (1, 3, 3)).astype(np.float32)
    lab = np.array([[1, 0, 1]])
    mask = rng.standard_normal((1, 32, 32, 32)).astype(np.float32)
    args = [jax.device_put(jnp.asarray(a)) for a in (emb, pts, lab, mask)]
    dev = "cuda" if gpu else "cpu"
    e = torch.from_numpy(emb.transpose(0, 4, 1, 2, 3).copy()).to(dev)
    p, lb = torch.from_numpy(pts).to(dev), torch.from_numpy(lab).to(dev)
    mk = torch.from_numpy(mask[:, None]).to(dev)

    def torch_click():
        sparse, dense = ref.prompt_encoder(points=(p, lb), boxes=None, masks=mk)
        low, _ = ref.mask_decoder(e, ref.prompt_encoder.get_dense_pe(), sparse, dense, False)
        return F.interpolate(low, size=(128, 128, 128), mode="trilinear", align_corners=False)

    def sync(o):
        if gpu:
            torch.cuda.synchronize()
        return o

    def torch_click_autocast():
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=gpu):
            return torch_click()

    times = interleaved_medians(
        {
            "ours": (lambda: click(state, *args), jax.block_until_ready),
            "torch": (torch_click_autocast, sync),
        },
        repeats,
    )
    t, tt = times["ours"], times["torch"]
    return {"click_b1_ms": 1e3 * t, "torch_click_b1_ms": 1e3 * tt, "ratio_click_b1": t / tt}


def bench_train(ours, ref, batch, clicks, repeats, gpu, variants, report=lambda d: None):
    """The original recipe's step (batch, 11 clicks, AdamW, batch-pooled normalisation) on
    both sides; each of our variants is a config change ("cudnn", "einsum+remat",
    "cudnn+unroll", ...) timed on the same batch. Both sides train copies, so the later
    sections still compare the same weights.

    On CPU the sides are timed round-robin. On a GPU the original (~63 GiB at batch 12) runs
    first and frees its memory before ours is compiled; `report` gets the figures so far
    after each side, so a run cut short keeps them."""
    import copy

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from benchmarks.torch_reference import OriginalTrainStep
    from sammed3d_jax.train.optim import OptimConfig, make_optimizer
    from sammed3d_jax.train.step import TrainConfig, init_train_state, make_train_step

    rng = np.random.default_rng(0)
    image = (rng.standard_normal((batch, 128, 128, 128)) * 100 + 50).astype(np.float32)
    label = np.zeros((batch, 128, 128, 128), np.uint8)
    label[:, 40:90, 30:80, 50:100] = 1
    out: dict[str, float] = {}

    dev = "cuda" if gpu else "cpu"
    trainer = OriginalTrainStep(copy.deepcopy(ref), num_clicks=clicks)
    tensors = {"image": torch.from_numpy(image).to(dev), "label": torch.from_numpy(label).to(dev)}
    if gpu:
        torch.cuda.reset_peak_memory_stats()

    def sync(o):
        if gpu:
            torch.cuda.synchronize()
        return o

    def torch_step():
        return trainer(tensors["image"], tensors["label"])

    def torch_figures(tt: float) -> None:
        out["torch_train_step_s"] = tt
        out["torch_train_volumes_per_sec"] = batch / tt
        print(f"[train] original: {tt * 1e3:.1f} ms/step", file=sys.stderr, flush=True)

    if gpu:
        torch_figures(median_time(torch_step, repeats, sync))
        out["torch_train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del trainer
        tensors.clear()
        torch.cuda.empty_cache()
        report(out)

    data = {"image": jnp.asarray(image), "label": jnp.asarray(label)}
    data["sample_mask"] = jnp.ones((image.shape[0],), bool)  # as train.py passes it
    key = jax.random.key(0)
    steps = {}
    for variant in variants:
        changes, flags = parse_variant(variant, train=True)
        train_cfg = TrainConfig(
            num_clicks=clicks,
            click_loop=next((f for f in ("unroll", "scan") if f in flags), "auto"),
            normalization="batch",
        )
        model = with_config(ours, **changes)
        # A copy: the step donates its state, which must not delete `ours`' arrays.
        nnx.update(model, jax.tree.map(jnp.copy, nnx.state(ours)))
        tx = make_optimizer(model, OptimConfig())
        graphdef, state = init_train_state(model, tx)
        step = jax.jit(make_train_step(graphdef, tx, train_cfg), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = step.lower(state, data, key).compile()
        compile_s = time.perf_counter() - t0
        holder = {"state": state}

        def run(compiled=compiled, holder=holder):
            holder["state"], m = compiled(holder["state"], data, key)
            return m

        steps[variant] = run
        mem = compiled.memory_analysis()
        name = _train_name(variant, variants)
        out[f"{name}_compile_s"] = compile_s
        if mem is not None:
            total = (
                mem.temp_size_in_bytes
                + mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                - mem.alias_size_in_bytes
            )
            out[f"{name}_compiled_gib"] = total / 2**30
        if gpu:  # one variant at a time: each holds its own state and optimizer
            _train_figures(out, name, median_time(run, repeats, jax.block_until_ready), batch)
            stats = jax.devices()[0].memory_stats() or {}
            if variant == variants[0] and "peak_bytes_in_use" in stats:
                # JAX's allocator's peak in this process so far: the first variant's step
                # (and the weights it was copied from), measured as it ran.
                out["train_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
            del steps[variant], holder, compiled, state, run
            print(f"[train] {variant}: {out[f'{name}_step_s'] * 1e3:.1f} ms/step", file=sys.stderr)
            report(out)
    if not gpu:
        timed = {"torch": (torch_step, sync)}
        timed.update({v: (fn, jax.block_until_ready) for v, fn in steps.items()})
        times = interleaved_medians(timed, repeats)
        torch_figures(times["torch"])
        for variant in variants:
            _train_figures(out, _train_name(variant, variants), times[variant], batch)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["train_process_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    # Run-time peaks on both sides where both allocators report one (GPU): ours from JAX's
    # allocator, the original's from torch.cuda.max_memory_allocated. On CPU neither side's
    # peak can be told apart in one process: no memory ratio there.
    if gpu and "train_peak_gib" in out:
        out["ratio_train_peak_memory"] = out["train_peak_gib"] / out["torch_train_peak_gib"]
    out["ratio_train_throughput"] = (
        out["train_volumes_per_sec"] / out["torch_train_volumes_per_sec"]
    )
    return out


def _train_name(variant: str, variants: list[str]) -> str:
    """Key prefix of a training variant: "train" for the first, else train_<variant>."""
    return "train" if variant == variants[0] else f"train_{variant_key(variant)}"


def _train_figures(out: dict, name: str, t: float, batch: int) -> None:
    out[f"{name}_step_s"] = t
    out[f"{name}_volumes_per_sec"] = batch / t


def shared_data_root() -> Path | None:
    """The shared folder holding ``data/`` (``$SAMMED3D_SHARED``, else ``../shared``)."""
    for cand in (os.environ.get("SAMMED3D_SHARED"), REPO.parent / "shared"):
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand)
    return None


def bench_pipeline(shared: Path) -> dict[str, Any]:
    """Input pipeline rates (128³ crops from raw NIfTI vs ArrayRecord shards, one worker), in
    a subprocess. There is no PyTorch side: the original's loader (torchio transforms in a
    PyTorch DataLoader) is not a dependency of this project, so no ratio is reported."""
    import subprocess

    cmd = [sys.executable, str(REPO / "benchmarks" / "input_pipeline.py"), "--workers", "1"]
    proc = subprocess.run(
        [*cmd, "--shared", str(shared)], capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise RuntimeError(f"input_pipeline.py exit {proc.returncode}: {last}")
    runs = json.loads(proc.stdout.strip().splitlines()[-1])["pipeline"]
    raw, shards = runs["raw_workers1"], runs["shards_workers1"]
    return {
        "pipeline_raw_volumes_per_sec_per_worker": raw["volumes_per_s"],
        "pipeline_shards_volumes_per_sec_per_worker": shards["volumes_per_s"],
        "pipeline_shards_volumes_per_cpu_sec": shards["volumes_per_cpu_s"],
        "pipeline_raw_batch_s_spread": raw["batch_seconds"],
        "pipeline_shards_batch_s_spread": shards["batch_seconds"],
        "torch_pipeline": "not measured (the original's torchio loader is not a dependency)",
    }


def measure_matmul_peak(dtype_name: str) -> float:
    """Achieved FLOP/s of a large matmul on this device: the roofline the MFU refers to."""
    import jax
    import jax.numpy as jnp

    # GPU: a large square product; CPU: the encoder MLP's shape at batches 1 and 8, the
    # faster of the two (a batch-1 product stays in the caches and runs faster on CPUs).
    if jax.devices()[0].platform == "gpu":
        shapes = [(8192, 8192, 8192)]
    else:
        shapes = [(512, 768, 3072), (4096, 768, 3072)]
    dtype = jnp.dtype(dtype_name)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    rates = []
    for m, k, n in shapes:
        ka, kb = jax.random.split(jax.random.key(m))
        a = jax.random.normal(ka, (m, k), dtype)  # never time on constant data
        b = jax.random.normal(kb, (k, n), dtype)
        t = median_time(lambda a=a, b=b: f(a, b), 5 if m > 512 else 20, jax.block_until_ready)
        rates.append(2 * m * k * n / t)
    return max(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batches", default=None, help="encoder batches, e.g. 1,2,4")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--clicks", type=int, default=11)
    parser.add_argument(
        "--skip", default="", help="comma list of: encoder,accuracy,click,train,pipeline"
    )
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--torch-compile-modes",
        default="default",
        help="torch.compile modes to time, e.g. default,reduce-overhead (CUDA graphs); the "
        "compiled figures are the fastest mode's",
    )
    parser.add_argument(
        "--torch-compile-batches", default=None, help="batches to torch.compile (default: all)"
    )
    parser.add_argument(
        "--attention",
        default=None,
        help="encoder variants IMPL[+exact|+tanh] to time (attention implementation, GELU "
        "form; default: tanh in bfloat16), first = main keys "
        "(default: cudnn,einsum on GPU, einsum on CPU)",
    )
    parser.add_argument(
        "--train-variants",
        default=None,
        help="training variants IMPL[+remat][+unroll|+scan][+exact|+tanh] (encoder remat, "
        "click loop unrolled or a device loop (default: unrolled on GPUs), as --attention), "
        "first = main keys (default: first --attention)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    gpu = args.device == "gpu"
    skip = set(filter(None, args.skip.split(",")))

    if gpu:
        # Both frameworks share the GPU: JAX allocates on demand instead of taking 75 %.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch

    if gpu and jax.devices()[0].platform != "gpu":
        print("error: --device gpu but JAX sees no GPU", file=sys.stderr)
        return 2
    if not gpu:
        jax.config.update("jax_platforms", "cpu")
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        # The original's fastest published setting: TF32 for whatever autocast leaves in fp32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from benchmarks.torch_reference import build_medim
    from sammed3d_jax.checkpoint import model_from_state_dict

    dtype = "bfloat16" if gpu else "float32"
    impls = (args.attention or ("cudnn,einsum" if gpu else "einsum")).split(",")
    train_variants = (args.train_variants or impls[0]).split(",")
    ref = build_medim("cuda" if gpu else "cpu").eval()
    sd = {k: v.detach().cpu().numpy() for k, v in ref.state_dict().items()}
    try:  # a typo fails here, not after minutes of timing
        for v in impls:
            parse_variant(v)
        for v in train_variants:
            parse_variant(v, train=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ours, _ = model_from_state_dict(sd, dtype=dtype, **parse_variant(impls[0])[0])
    batches = [int(b) for b in (args.batches or ("1,4,12,32,64" if gpu else "1,2")).split(",")]
    compile_batches = set()
    if args.torch_compile:
        compile_batches = set(batches)
        if args.torch_compile_batches:
            compile_batches = {int(b) for b in args.torch_compile_batches.split(",")}
    repeats = args.repeats or (10 if gpu else 5)
    result: dict[str, Any] = {"device": args.device, **device_info(jax, torch), "dtype": dtype}
    result["attention_impls"] = impls
    peak = measure_matmul_peak(dtype)
    result["matmul_peak_tflops_measured"] = peak / 1e12

    def save(partial=None):
        """Merge `partial` into the result and rewrite --out: a run cut short keeps it."""
        result.update(partial or {})
        if args.out:
            args.out.write_text(json.dumps(result, sort_keys=True) + "\n")

    def section(name, fn):
        """Run one section; a failure is recorded, not fatal, so the others still report."""
        t0 = time.perf_counter()
        try:
            result.update(fn())
        except Exception as e:  # report and go on: one broken section must not lose the rest
            result[f"{name}_error"] = f"{type(e).__name__}: {e}"[:2000]
        result[f"{name}_wall_s"] = time.perf_counter() - t0
        print(f"[{name}] done in {result[f'{name}_wall_s']:.0f} s", file=sys.stderr, flush=True)
        save()

    if "train" not in skip:
        train_batch = args.train_batch or (12 if gpu else 1)
        train_repeats = max(repeats // 2, 5)
        result["train_repeats"] = train_repeats
        section(
            "train",
            lambda: bench_train(
                ours,
                ref,
                train_batch,
                args.clicks,
                train_repeats,
                gpu,
                train_variants,
                report=save,
            ),
        )
        result["train_batch"] = train_batch
        result["train_clicks"] = args.clicks
        result["train_variants"] = train_variants
    if "click" not in skip:
        section("click", lambda: bench_click(ours, ref, max(repeats, 5), gpu))
    variants = encoder_variants(ours, impls)
    if "encoder" not in skip:
        section(
            "encoder",
            lambda: bench_encoder(
                variants,
                ref,
                batches,
                repeats,
                gpu,
                compile_batches,
                args.torch_compile_modes.split(","),
                report=save,
            ),
        )
        enc_keys = [b for b in batches if f"encoder_b{b}_volumes_per_sec" in result]
        if enc_keys:
            best = max(enc_keys, key=lambda b: result[f"encoder_b{b}_volumes_per_sec"])
            result["encoder_best_batch"] = best
            result["encoder_best_volumes_per_sec"] = result[f"encoder_b{best}_volumes_per_sec"]
            tc = [b for b in batches if f"torch_compiled_encoder_b{b}_volumes_per_sec" in result]
            if tc:
                # The original's best over the batches it was compiled at (the JSON names
                # them: a ratio against batch 1 alone overstates ours).
                tb = max(tc, key=lambda b: result[f"torch_compiled_encoder_b{b}_volumes_per_sec"])
                result["torch_compiled_encoder_batches"] = tc
                result["torch_compiled_encoder_best_batch"] = tb
                best_tc = result[f"torch_compiled_encoder_b{tb}_volumes_per_sec"]
                result["torch_compiled_encoder_best_volumes_per_sec"] = best_tc
                result["ratio_encoder_best_throughput_vs_compiled"] = (
                    result["encoder_best_volumes_per_sec"] / best_tc
                )
    if gpu and "accuracy" not in skip:
        fp32, _ = model_from_state_dict(sd, dtype="float32")
        from sammed3d_jax.model.sam import split_flat

        section("accuracy", lambda: encoder_accuracy(variants, split_flat(fp32)))
    if "pipeline" not in skip:
        shared = shared_data_root()
        if shared is None:
            result["pipeline_skipped"] = "no shared data folder ($SAMMED3D_SHARED or ../shared)"
        else:
            section("pipeline", lambda: bench_pipeline(shared))
    # Utilisation against the fastest matmul rate seen in the run (measured before and after
    # the timed sections, so a slow spell at the start does not inflate it).
    peak = max(peak, measure_matmul_peak(dtype))
    result["matmul_peak_tflops_measured"] = peak / 1e12
    # Also against the data-sheet peak where the GPU is known (the usual definition of MFU;
    # the measured matmul rate is below it, e.g. ~670 vs 989 TFLOP/s on an H200).
    spec = SPEC_BF16_TFLOPS.get(str(result.get("torch_device", ""))) if gpu else None
    if spec:
        result["spec_peak_tflops_bf16"] = spec
    flops = {}
    if "encoder_best_volumes_per_sec" in result:
        flops["encoder_mfu_best"] = (
            ENCODER_GFLOP_EXACT * 1e9 * result["encoder_best_volumes_per_sec"]
        )
    for variant in train_variants if "train" not in skip else ():
        name = _train_name(variant, train_variants)
        if f"{name}_volumes_per_sec" in result:
            vps = result[f"{name}_volumes_per_sec"]
            flops[f"{name}_mfu_encoder_fwd_bwd"] = 3 * ENCODER_GFLOP_EXACT * 1e9 * vps
    for key, rate in flops.items():
        result[key] = rate / peak
        if spec:
            result[f"{key}_spec"] = rate / (spec * 1e12)
    result["targets"] = target_report(result, args.device)
    line = json.dumps(result, sort_keys=True)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
