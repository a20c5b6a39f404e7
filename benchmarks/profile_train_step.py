"""Where the training step's time goes: a per-module profile of one compiled step.

Runs the original recipe's step (vit_b_ori, 128³, AdamW, 11 clicks) under the JAX profiler,
maps every executed XLA op back to the Python source that produced it (the stack frames XLA
keeps in the compiled module) and sums the op times by

- module: image encoder, prompt encoder, mask decoder, upsampling, loss, click sampling,
  optimizer, other;
- direction: forward or backward (``transpose(...)`` in the op's name);
- place: inside the click loop (the ``while`` body) or outside it.

On a GPU the times are the device's kernel times; on a CPU they are the host thunks' times
(both threads of a 2-core machine add up, so the total can exceed the wall time).

    python benchmarks/profile_train_step.py --device cpu --batch 1
    python benchmarks/profile_train_step.py --device gpu --batch 12 --attention cudnn
    python benchmarks/profile_train_step.py --device cpu --batch 12 --memory-only
    python benchmarks/profile_train_step.py --device gpu --target encoder --batch 1 --by source

On a GPU, run with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` (as
``benchmarks/gpu_session.sh`` does): inside XLA's command buffers (CUDA graphs) kernels
cannot be told apart and most of the time is attributed to the command buffers.

``--target encoder`` profiles the image encoder's forward pass alone, ``--target click`` one
click (prompt encoder, mask decoder, upsampling to full resolution); ``--by source`` groups
the op time by the innermost function of this project that produced each op (file:function)
instead of by module, which splits the encoder into its attention, MLP, norms, ...
The last line printed is a JSON object of the category totals (ms per step).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Source file (or function-name prefix) -> category, first match wins walking outwards.
CATEGORIES = (
    ("upsample", "upsampling"),
    ("image_encoder.py", "image encoder"),
    ("prompt_encoder.py", "prompt encoder"),
    ("mask_decoder.py", "mask decoder"),
    ("transformer.py", "mask decoder"),
    ("losses.py", "loss"),
    ("clicks.py", "click sampling"),
    ("optim.py", "optimizer"),
    ("/optax/", "optimizer"),
)


def parse_hlo(text: str) -> dict[str, tuple[str, str, int]]:
    """Instruction name -> (computation, op_name, stack_frame_id) from compiled HLO text."""
    out: dict[str, tuple[str, str, int]] = {}
    comp = ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            comp = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            continue
        m = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        out[m.group(1)] = (comp, op.group(1) if op else "", int(frame.group(1)) if frame else 0)
    return out


def parse_stack_frames(text: str) -> dict[int, list[tuple[str, str]]]:
    """stack_frame_id -> [(file, function), ...] from the innermost frame outwards."""
    sections: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line
            sections[current] = {}
            continue
        if current and (m := re.match(r"^(\d+) (.*)$", line)):
            sections[current][int(m.group(1))] = m.group(2)
        elif current and line.strip() == "":
            continue
        elif current:
            current = None
    files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in sections.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        fn = re.search(r"function_name_id=(\d+)", v)
        locs[k] = (
            files.get(int(f.group(1)), "") if f else "",
            funcs.get(int(fn.group(1)), "") if fn else "",
        )
    parents = {}
    frame_loc = {}
    for k, v in sections.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        par = re.search(r"parent_frame_id=(\d+)", v)
        frame_loc[k] = locs.get(int(loc.group(1)), ("", "")) if loc else ("", "")
        parents[k] = int(par.group(1)) if par else 0
    chains: dict[int, list[tuple[str, str]]] = {}
    for k in frame_loc:
        chain, seen, f = [], set(), k
        while f in frame_loc and f not in seen:
            seen.add(f)
            chain.append(frame_loc[f])
            f = parents[f] - 1 if parents[f] - 1 != f else 0  # parent ids are 1-based
        chains[k] = chain
    return chains


def categorise(chain: list[tuple[str, str]], op_name: str = "") -> str:
    if "dynamic_update_index_in_dim" in op_name and "while/body" in op_name:
        return "loop residuals"  # a pass's activations stacked for the backward pass
    for file, func in chain:
        for key, name in CATEGORIES:
            if key in file or func.startswith(key):
                return name
    if any(func.endswith("train_step") for _, func in chain[:1]):
        return "optimizer"  # update, norms and metrics: train_step's own lines
    return "other"


def source_of(chain: list[tuple[str, str]]) -> str:
    """The innermost frame of this project's package as ``file:function``."""
    for file, func in chain:
        if "/sammed3d_jax/" in file:
            return f"{file.rsplit('/', 1)[-1]}:{func}"
    return f"{chain[0][0].rsplit('/', 1)[-1]}:{chain[0][1]}" if chain else "?"


def op_times(
    trace_dir: str, module: str
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Summed durations (ns) and launch counts by XLA op of the HLO module ``module``.

    Device kernels if the trace has any (GPU), else the host's thunks (CPU). Only events
    tagged with this module count: a trace also catches whatever else the process runs.
    """
    from jax._src.lib import _profile_data

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = _profile_data.ProfileData.from_file(path)
    found = {k: (collections.Counter(), collections.Counter()) for k in ("dev", "xla", "host")}

    def add(kind: str, op: str, ns: int) -> None:
        found[kind][0][op] += ns
        found[kind][1][op] += 1

    for plane in data.planes:
        if plane.name.startswith("/device:"):
            for line in plane.lines:
                for ev in line.events:
                    stats = dict(ev.stats)
                    if line.name == "XLA Ops":  # derived line: one event per op
                        add("xla", str(stats.get("hlo_op", ev.name)), ev.duration_ns)
                    elif stats.get("hlo_module") == module and "hlo_op" in stats:
                        add("dev", str(stats["hlo_op"]), ev.duration_ns)  # kernels on streams
        elif plane.name.startswith("/host:CPU"):
            for line in plane.lines:
                for ev in line.events:
                    stats = dict(ev.stats)
                    if stats.get("hlo_module") == module and "hlo_op" in stats:
                        add("host", str(stats["hlo_op"]), ev.duration_ns)
    for kind in ("dev", "xla", "host"):
        if found[kind][0]:
            return found[kind]
    return collections.Counter(), collections.Counter()


def compiled_memory_gib(compiled: Any) -> float | None:
    """Device memory of a compiled program by XLA's analysis: arguments + outputs +
    temporaries, less the donated aliases (None where the backend gives no analysis)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (
        mem.temp_size_in_bytes
        + mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    ) / 2**30


def build_target(
    *,
    target: str,
    variant: str,
    batch: int,
    clicks: int,
    attention: str,
    click_loop: str,
    dtype: str,
    remat: bool = False,
    gelu: str = "auto",
) -> tuple[Any, Any, tuple]:
    """``(jitted fn, state, inputs)`` of the program to profile: the training step (original
    recipe, AdamW, ``fn(state, batch, key)``, state donated), the encoder's forward pass or
    one click (prompt encoder, decoder, upsampling to full resolution) on random inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sammed3d_jax import Sam3DConfig, build_sam3d
    from sammed3d_jax.train.optim import OptimConfig, make_optimizer
    from sammed3d_jax.train.step import TrainConfig, init_train_state, make_train_step

    cfg = Sam3DConfig.from_variant(
        variant, attention_impl=attention, remat=remat, gelu=gelu, dtype=dtype
    )
    model = build_sam3d(cfg)
    s = cfg.img_size
    rng = np.random.default_rng(0)
    image = (rng.standard_normal((batch, s, s, s)) * 100 + 50).astype(np.float32)
    label = np.zeros((batch, s, s, s), np.uint8)
    label[:, s // 3 : 2 * s // 3, s // 4 : 3 * s // 4, s // 3 : 3 * s // 4] = 1
    data = {"image": jnp.asarray(image), "label": jnp.asarray(label)}
    data["sample_mask"] = jnp.ones((image.shape[0],), bool)  # as train.py passes it
    if target == "step":
        tx = make_optimizer(model, OptimConfig())
        graphdef, state = init_train_state(model, tx)
        train_cfg = TrainConfig(num_clicks=clicks, click_loop=click_loop)
        fn = jax.jit(make_train_step(graphdef, tx, train_cfg), donate_argnums=0)
        return fn, state, (data, jax.random.key(0))

    from sammed3d_jax.model.common import upsample_logits
    from sammed3d_jax.model.sam import compute_dtype_weights, merge_flat, split_flat

    flatdef, state = split_flat(compute_dtype_weights(model))  # as the inference engine
    if target == "encoder":
        return jax.jit(lambda st, x: merge_flat(flatdef, st).encode(x)), state, (data["image"],)

    def click(st, emb, pts, labels, mask):  # one click on an embedding, to full resolution
        out = merge_flat(flatdef, st).decode(emb, pts, labels, mask)
        return upsample_logits(out.low_res_logits, s)

    g, low = s // cfg.patch_size, cfg.low_res_size
    inputs = (
        jnp.asarray(rng.standard_normal((batch, g, g, g, cfg.prompt_embed_dim))),
        jnp.asarray(rng.uniform(0, s - 1, (batch, 3, 3)), jnp.float32),
        jnp.asarray(np.tile([1, 0, 1], (batch, 1)), jnp.int32),
        jnp.asarray(rng.standard_normal((batch, low, low, low)), jnp.float32),
    )
    return jax.jit(click), state, inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--variant", default="vit_b_ori")
    p.add_argument("--target", choices=["step", "encoder", "click"], default="step")
    p.add_argument("--by", choices=["module", "source"], default="module")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--clicks", type=int, default=11)
    p.add_argument("--attention", default="auto", help="attention_impl of the model")
    p.add_argument("--gelu", choices=["auto", "exact", "tanh"], default="auto", help="GELU form")
    p.add_argument(
        "--click-loop",
        choices=["auto", "scan", "unroll"],
        default="auto",
        help="the click loop as a device loop or unrolled (auto: unrolled on GPUs)",
    )
    p.add_argument("--remat", action="store_true", help="rematerialise the encoder blocks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=15, help="print the N most expensive ops")
    p.add_argument("--dump-hlo", metavar="FILE", help="write the compiled (optimised) HLO here")
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="only compile the step and print XLA's memory analysis of it",
    )
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np

    fn, state, inputs = build_target(
        target=args.target,
        variant=args.variant,
        batch=args.batch,
        clicks=args.clicks,
        attention=args.attention,
        click_loop=args.click_loop,
        dtype="bfloat16" if args.device == "gpu" else "float32",
        remat=args.remat,
        gelu=args.gelu,
    )
    compiled = fn.lower(state, *inputs).compile()
    if args.dump_hlo:
        Path(args.dump_hlo).write_text(compiled.as_text())
    memory_gib = compiled_memory_gib(compiled)
    if memory_gib is not None:
        print(f"compiled {args.target}: {memory_gib:.2f} GiB (XLA memory analysis)")
    if args.memory_only:
        print(json.dumps({"batch": args.batch, "compiled_gib": memory_gib}))
        return 0
    text = compiled.as_text()
    instrs = parse_hlo(text)
    chains = parse_stack_frames(text)

    holder = {"state": state}

    def run() -> Any:
        if args.target != "step":
            return compiled(holder["state"], *inputs)
        holder["state"], metrics = compiled(holder["state"], *inputs)
        return metrics

    for _ in range(2):
        jax.block_until_ready(run())
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        walls.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.repeats):
            jax.block_until_ready(run())
        jax.profiler.stop_trace()
        times, launches = op_times(trace_dir, text.split()[1].rstrip(","))
    n_events = sum(launches.values())

    per_step = {k: v / args.repeats / 1e6 for k, v in times.items()}
    table: collections.Counter[tuple[str, str, str]] = collections.Counter()
    count: collections.Counter[tuple[str, str, str]] = collections.Counter()  # launches
    top_op: dict[tuple[str, str, str], tuple[str, float]] = {}
    unknown = 0.0
    for name, ms in per_step.items():
        if name not in instrs:
            unknown += ms
            continue
        _, op_name, frame = instrs[name]
        place = "loop" if "while/body" in op_name else "main"
        direction = "bwd" if "transpose(" in op_name else "fwd"
        chain = chains.get(frame, [])
        what = source_of(chain) if args.by == "source" else categorise(chain, op_name)
        row = (what, direction, place)
        table[row] += ms
        count[row] += launches[name] / args.repeats
        if ms > top_op.get(row, ("", 0.0))[1]:
            top_op[row] = (name, ms)
    total = sum(per_step.values())
    what = {"step": f"{args.clicks} clicks", "encoder": "encoder forward"}.get(
        args.target, "one click"
    )
    print(
        f"device: {jax.devices()[0].device_kind}; batch {args.batch}, {what}, "
        f"wall {np.median(walls) * 1e3:.2f} ms, summed op time {total:.2f} ms, "
        f"{n_events / args.repeats:.0f} ops/kernels per call"
    )
    width = max([16] + [len(r[0]) for r in table])
    head = f"{args.by:{width}s} {'dir':4s} {'place':5s} {'ms':>9s} {'share':>6s} {'ops':>6s}"
    print(f"{head}  largest op")
    for row, ms in table.most_common():
        cat, direction, place = row
        big = top_op[row][0]
        print(
            f"{cat:{width}s} {direction:4s} {place:5s} {ms:9.2f} {ms / total:6.1%} "
            f"{count[row]:6.0f}  {big[:40]}"
        )
    if unknown:
        print(f"{'(unmapped)':27s} {unknown:9.2f} {unknown / total:6.1%}")
    print(f"\ntop {args.top} ops:")
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]:
        _, op_name, frame = instrs.get(name, ("?", "?", 0))
        chain = chains.get(frame, [])
        what = source_of(chain) if args.by == "source" else categorise(chain, op_name)
        print(f"{ms:9.3f} ms  {name[:44]:44s} {what[:30]:30s} {op_name[-60:]}")
    result = {
        "device": jax.devices()[0].device_kind,
        "target": args.target,
        "batch": args.batch,
        "ops_per_call": n_events / args.repeats,
        "clicks": args.clicks if args.target == "step" else None,
        "wall_ms": float(np.median(walls) * 1e3),
        "summed_op_ms": total,
        "unmapped_ms": unknown,
        "compiled_gib": memory_gib,
        "by_category_ms": {"/".join(k): round(v, 3) for k, v in table.most_common()},
        "ops_by_category": {"/".join(k): count[k] for k, _ in table.most_common()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
