"""How many kernels the GPU program launches, compiled for a GPU this machine does not have.

The training step and the batch-1 encoder are bound by the number of kernels they launch
(BENCHMARKS.md, H200 profiles), so a change's effect on that number is worth knowing before
a GPU is at hand. XLA compiles for a described GPU without one (deviceless compilation,
``jax.experimental.topologies`` with a ``target_config``); this script builds the same
programs as ``profile_train_step.py`` (bfloat16, cuDNN attention, the unrolled click loop:
the GPU defaults), compiles them for an H200 or H100 and counts the thunks of the optimised
program by the Python source that produced them: one per fusion, library call (cuBLAS,
cuDNN) or copy, loop bodies counted once per trip, every branch of a conditional once. A thunk is one kernel or library call;
the H200 profile of the encoder at batch 1 counted 383 kernels where this counts 390.

Needs the CUDA plugin for the installed jax (no GPU, no driver), e.g. in a separate venv::

    python -m venv --system-site-packages /tmp/gpuvenv
    /tmp/gpuvenv/bin/pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
    /tmp/gpuvenv/bin/python benchmarks/gpu_kernel_count.py --target step --batch 12

Triton GEMM fusions are off (``--xla_gpu_enable_triton_gemm=false``): without a device XLA
cannot autotune them and some tile searches fail; cuBLAS takes those products instead, as
it may on the device. Counts are a property of the compiled program, not a timing. The last
line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profile_train_step import (
    build_target,
    compiled_memory_gib,
    parse_stack_frames,
    source_of,
)

# Device descriptions (XLA's GpuTargetConfig) of the cards this project was measured on.
_DEVICE_INFO = {
    "h200": ("NVIDIA H200", 4_800_000_000_000, 150_754_820_096),
    "h100": ("NVIDIA H100 80GB HBM3", 3_352_320_000_000, 84_929_347_584),
}
_TARGET_CONFIG = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{name}"
"""
# Instructions that launch nothing: views, tuples, constants, control flow (walked into).
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "add-dependency",
    "opt-barrier",
    "partition-id",
    "replica-id",
}
_INSTR = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = .*? ([a-z][a-z\-]*)\(")


def count_thunks(hlo_text: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Thunks of a compiled HLO module by source (``file:function``) and by kind.

    Kinds: ``fusion``, the custom call's target (``__cublas$lt$matmul``, cuDNN, ...), or
    the opcode of a lone instruction (``copy``, ``sort``, ...). The bodies of ``while``
    loops count once per trip when XLA knows the trip count, else once.
    """
    comps: dict[str, list[str]] = {}
    entry, body = "", None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            head = line.split()
            name = (head[1] if head[0] == "ENTRY" else head[0]).lstrip("%")
            body = comps.setdefault(name, [])
            entry = name if head[0] == "ENTRY" else entry
        elif body is not None and _INSTR.match(line):
            body.append(line)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    chains = parse_stack_frames(hlo_text)
    by_source: collections.Counter[str] = collections.Counter()
    by_kind: collections.Counter[str] = collections.Counter()

    def walk(comp: str, times: int, depth: int) -> None:
        if depth > 32:
            raise ValueError(f"HLO computations nested too deep at {comp}")
        for line in comps.get(comp, ()):
            opcode = _INSTR.match(line).group(2)  # type: ignore[union-attr]
            if opcode in _FREE:
                continue
            if opcode in ("while", "conditional", "call"):
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                n = int(trip.group(1)) if opcode == "while" and trip else 1
                for sub in re.findall(
                    r"(?:condition|body|branch_computations|to_apply)=\{?%([\w.\-]+)", line
                ):
                    walk(sub, times * n, depth + 1)
                for subs in re.findall(r"branch_computations=\{([^}]*)\}", line):
                    for sub in re.findall(r"%([\w.\-]+)", subs)[1:]:
                        walk(sub, times * n, depth + 1)
                continue
            kind = opcode
            if opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', line)
                kind = target.group(1) if target else opcode
            frame = re.search(r"stack_frame_id=(\d+)", line)
            chain = chains.get(int(frame.group(1)), []) if frame else []
            by_source[source_of(chain)] += times
            by_kind[kind] += times

    walk(entry, 1, 0)
    return by_source, by_kind


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", choices=sorted(_DEVICE_INFO), default="h200")
    p.add_argument("--variant", default="vit_b_ori")
    p.add_argument("--target", choices=["step", "encoder", "click"], default="step")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--clicks", type=int, default=11)
    p.add_argument("--attention", default="cudnn", help="attention_impl of the model")
    p.add_argument("--click-loop", choices=["scan", "unroll"], default="unroll")
    p.add_argument("--top", type=int, default=25, help="print the N sources with most thunks")
    p.add_argument("--dump-hlo", metavar="FILE", help="write the compiled (optimised) HLO here")
    args = p.parse_args(argv)
    # The process has no GPU: jax runs on the CPU and the GPU is only a compilation target.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()

    import jax
    from jax.experimental import topologies

    name, bandwidth, memory = _DEVICE_INFO[args.gpu]
    config = _TARGET_CONFIG.format(name=name, bandwidth=bandwidth, memory=memory)
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=config, topology="1x1x1"
        )
    except Exception as exc:  # the plugin's errors vary by version
        print(
            f"gpu_kernel_count: cannot describe a CUDA target ({type(exc).__name__}: {exc}); "
            "install the CUDA plugin of the installed jax, e.g. "
            f'pip install "jax[cuda12]=={jax.__version__}"',
            file=sys.stderr,
        )
        return 2
    mesh = topologies.make_mesh(topology, (1,), ("d",))
    on_gpu = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # The model picks its GPU code paths (cuDNN attention, XLA convolutions, the unrolled
    # click loop) by the default backend; here that is the CPU, so report the target's.
    jax.default_backend = lambda: "gpu"
    import sammed3d_jax.model.image_encoder as image_encoder

    image_encoder.cudnn_attention_available = lambda: True

    fn, state, inputs = build_target(
        target=args.target,
        variant=args.variant,
        batch=args.batch,
        clicks=args.clicks,
        attention=args.attention,
        click_loop=args.click_loop,
        dtype="bfloat16",
    )

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_gpu) if hasattr(x, "dtype") else x

    t0 = time.perf_counter()
    compiled = fn.lower(*jax.tree.map(abstract, (state, *inputs))).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    if args.dump_hlo:
        Path(args.dump_hlo).write_text(text)
    by_source, by_kind = count_thunks(text)
    total = sum(by_source.values())
    print(
        f"{name} (deviceless), {args.variant}, {args.target}, batch {args.batch}"
        + (f", {args.clicks} clicks ({args.click_loop})" if args.target == "step" else "")
        + f": {total} thunks; compiled in {compile_s:.0f} s"
    )
    print("by kind: " + ", ".join(f"{k} {v}" for k, v in by_kind.most_common()))
    memory_gib = compiled_memory_gib(compiled)
    if memory_gib is not None:
        print(f"device memory: {memory_gib:.2f} GiB (XLA memory analysis)")
    for source, n in by_source.most_common(args.top):
        print(f"{n:7d}  {source}")
    result = {
        "gpu": name,
        "target": args.target,
        "batch": args.batch,
        "clicks": args.clicks if args.target == "step" else None,
        "thunks": total,
        "memory_gib": memory_gib,
        "by_kind": dict(by_kind.most_common()),
        "by_source": dict(by_source.most_common()),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
