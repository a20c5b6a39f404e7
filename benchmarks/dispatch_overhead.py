"""Host time of one jitted inference call, by how the weights are passed.

    python benchmarks/dispatch_overhead.py --device gpu                  # encoder, batch 1
    python benchmarks/dispatch_overhead.py --device gpu --target click   # one click
    python benchmarks/dispatch_overhead.py --device gpu --attention einsum  # no cuDNN calls

At batch 1 a call can spend longer on the host (flattening and checking every argument,
handing each buffer to the runtime, launching the program) than the device spends running
it. Three ways of passing the same weights, timed round-robin:

* ``separate``: one buffer per state leaf (``split_flat(..., pack=False)``);
* ``packed``: ``split_flat``'s default, the weights that are not matmul or convolution
  operands in one buffer per dtype (what the inference engine passes);
* ``constants``: the weights closed over, so they are compiled into the program. For
  comparison only: it costs a copy of every weight in the executable and a compilation per
  set of weights.

Figures per way: ``serial_ms`` (call, then wait: the latency one call sees),
``dispatch_ms`` (until the call returns: host work) and ``pipelined_ms`` (per call when
``--pipeline`` calls are issued before waiting: the device's time when the host keeps up).
The outputs of ``separate`` and ``packed`` must be equal bit for bit. The last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAYS = ("separate", "packed", "constants")


def build_calls(model, target: str, batch: int) -> tuple[dict, int]:
    """{way: zero-argument call} for `target` ("encoder" or "click"), and the number of
    weight arrays each way passes ({way}_arrays)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sammed3d_jax.model.common import upsample_logits
    from sammed3d_jax.model.sam import merge_flat, split_flat

    cfg = model.config
    rng = np.random.default_rng(0)
    if target == "encoder":
        x = jnp.asarray(rng.standard_normal((batch,) + (cfg.img_size,) * 3, np.float32))
        inputs = (x,)

        def run(m, x):
            return m.encode(x)
    else:
        g, low = cfg.img_size // cfg.patch_size, cfg.low_res_size
        inputs = (
            jnp.asarray(rng.standard_normal((1, g, g, g, cfg.prompt_embed_dim), np.float32)),
            jnp.asarray(rng.uniform(0, cfg.img_size - 1, (1, 3, 3)), jnp.float32),
            jnp.asarray([[1, 0, 1]], jnp.int32),
            jnp.asarray(rng.standard_normal((1, low, low, low)), jnp.float32),
        )

        def run(m, emb, pts, lab, mask):
            return upsample_logits(m.decode(emb, pts, lab, mask).low_res_logits, cfg.img_size)

    calls, sizes = {}, {}
    for way in WAYS:
        flatdef, leaves = split_flat(model, pack=way != "separate")
        sizes[way] = len(leaves)
        if way == "constants":
            fn = jax.jit(lambda *a, f=flatdef, w=leaves: run(merge_flat(f, w), *a))
            calls[way] = lambda fn=fn: fn(*inputs)
        else:
            fn = jax.jit(lambda w, *a, f=flatdef: run(merge_flat(f, w), *a))
            calls[way] = lambda fn=fn, w=leaves: fn(w, *inputs)
    return calls, sizes


def measure(calls: dict, repeats: int, pipeline: int) -> dict[str, dict[str, float]]:
    import jax

    for fn in calls.values():  # compile and warm up
        jax.block_until_ready(fn())
    serial = {way: [] for way in calls}
    dispatch = {way: [] for way in calls}
    for _ in range(repeats):
        for way, fn in calls.items():
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            serial[way].append(time.perf_counter() - t0)
            dispatch[way].append(t1 - t0)
    result = {}
    for way, fn in calls.items():
        t0 = time.perf_counter()
        jax.block_until_ready([fn() for _ in range(pipeline)])
        result[way] = {
            "serial_ms": 1e3 * statistics.median(serial[way]),
            "dispatch_ms": 1e3 * statistics.median(dispatch[way]),
            "pipelined_ms": 1e3 * (time.perf_counter() - t0) / pipeline,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--target", choices=("encoder", "click"), default="encoder")
    p.add_argument("--variant", default="vit_b_ori")
    p.add_argument("--batch", type=int, default=1, help="encoder batch")
    p.add_argument(
        "--attention",
        choices=("cudnn", "xla", "einsum", "pallas"),
        help="encoder attention (default: cudnn on a GPU, einsum on CPU); cuDNN's fused "
        "attention is a library call the host launches, XLA's and Pallas' kernels are not",
    )
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--pipeline", type=int, default=30, help="calls issued before waiting")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.pipeline < 1:
        p.error("--batch, --repeats and --pipeline must be >= 1")

    import jax
    import numpy as np

    from benchmarks.click_latency import random_model
    from benchmarks.run import with_config
    from sammed3d_jax.model.sam import compute_dtype_weights

    gpu = args.device == "gpu"
    if gpu and jax.devices()[0].platform != "gpu":
        print("error: --device gpu but JAX sees no GPU", file=sys.stderr)
        return 2
    attention = args.attention or ("cudnn" if gpu else "einsum")
    if attention == "cudnn" and not gpu:
        p.error("--attention cudnn needs --device gpu")
    model = with_config(
        random_model(args.variant), dtype="bfloat16" if gpu else "float32", attention_impl=attention
    )
    model = compute_dtype_weights(model)  # as the inference engine
    calls, sizes = build_calls(model, args.target, args.batch)
    out_sep, out_packed = (np.asarray(calls[w]()) for w in ("separate", "packed"))
    result: dict = {
        "device": str(jax.devices()[0].device_kind),
        "target": args.target,
        "variant": args.variant,
        "attention": attention,
        "batch": args.batch if args.target == "encoder" else 1,
        "weight_arrays": sizes,
        "packed_equals_separate": bool(np.array_equal(out_sep, out_packed)),
    }
    result.update(measure(calls, args.repeats, args.pipeline))
    print(json.dumps(result))
    return 0 if result["packed_equals_separate"] else 1


if __name__ == "__main__":
    sys.exit(main())
