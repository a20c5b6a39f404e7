"""One click with the decoder's cross-attention regrouped vs projected, side by side.

    python benchmarks/cross_attention_ab.py [--points 1,3,10] [--repeats 30]

`DownscaleAttention` skips projecting the image tokens when the prompt side is small (see
its docstring). This times one click (prompt encoder, mask decoder, upsampling to 128³;
vit_b_ori, random weights, embedding precomputed) compiled both ways in one process,
alternating calls, and prints medians; the last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sammed3d_jax.model import transformer
from sammed3d_jax.model.common import upsample_logits
from sammed3d_jax.model.config import Sam3DConfig
from sammed3d_jax.model.sam import Sam3D, merge_flat, split_flat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="1,3,10")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    flatdef, state = split_flat(Sam3D(Sam3DConfig.from_variant("vit_b_ori"), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.standard_normal((1, 8, 8, 8, 384)), jnp.float32)
    mask = jnp.asarray(rng.standard_normal((1, 32, 32, 32)), jnp.float32)
    regrouped = transformer.DownscaleAttention.__call__

    def projected(self, q, k, v, key_mask=None):
        return self._projected(q, k, v, key_mask)

    def compiled(call, args):
        def click(state, emb, pts, lab, mask):
            m = merge_flat(flatdef, state)
            return upsample_logits(m.decode(emb, pts, lab, mask).low_res_logits, 128)

        transformer.DownscaleAttention.__call__ = call
        try:
            fn = jax.jit(click)
            fn(state, *args).block_until_ready()  # traced (and compiled) with `call`
        finally:
            transformer.DownscaleAttention.__call__ = regrouped
        return fn

    result = {"device": jax.devices()[0].device_kind}
    for n in (int(p) for p in args.points.split(",")):
        pts = jnp.asarray(rng.uniform(0, 127, (1, n, 3)), jnp.float32)
        call_args = (emb, pts, jnp.ones((1, n), jnp.int32), mask)
        fns = {
            "projected": compiled(projected, call_args),
            "regrouped": compiled(regrouped, call_args),
        }
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn(state, *call_args).block_until_ready()
                times[k].append(time.perf_counter() - t0)
        a, b = (1e3 * statistics.median(times[k]) for k in ("projected", "regrouped"))
        result[f"click_{n}pt_projected_ms"], result[f"click_{n}pt_regrouped_ms"] = a, b
        result[f"ratio_{n}pt"] = b / a
        print(f"{n} point(s): projected {a:.2f} ms, regrouped {b:.2f} ms ({b / a:.3f})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
