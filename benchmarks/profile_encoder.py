"""Where the encoder's time goes: each piece jitted and timed alone, at a few batch sizes.

    python benchmarks/profile_encoder.py --device gpu --batches 1,32 --attention cudnn,einsum

Pieces: patch embedding, one windowed block, one global block, the neck, and inside a
windowed block the qkv projection, the attention core (logits, relative-position bias,
softmax, weighted sum, closed-form padding term) and the MLP. Random weights of the
vit_b_ori architecture; the last line printed is one JSON object (milliseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.run import median_time  # noqa: E402


def encoder_pieces(enc) -> dict:
    """name -> (fn(encoder, x), input kind): the pieces timed, each reached through the
    encoder argument so that jit sees the parameters as inputs."""
    from sammed3d_jax.model.image_encoder import windowed_attention_exact

    wi = next(i for i, b in enumerate(enc.blocks) if b.window_size)
    gi = next(i for i, b in enumerate(enc.blocks) if not b.window_size)
    ws, dtype = enc.cfg.window_size, enc.cfg.compute_dtype

    def qkv(m, t):
        blk = m.blocks[wi]
        return blk.attn.qkv(blk.norm1(t).astype(dtype))

    def attention(m, t):
        blk = m.blocks[wi]
        return windowed_attention_exact(blk.attn, blk.norm1(t), ws)

    def mlp(m, t):
        blk = m.blocks[wi]
        return blk.mlp(blk.norm2(t))

    return {
        "encoder": (lambda m, x: m(x), "volume"),
        "patch_embed": (lambda m, x: m.embed_patches(x), "volume"),
        "windowed_block": (lambda m, t: m.blocks[wi](t), "tokens"),
        "global_block": (lambda m, t: m.blocks[gi](t), "tokens"),
        "neck": (lambda m, t: m.neck_forward(t), "tokens"),
        "windowed_qkv": (qkv, "tokens"),
        "windowed_attention": (attention, "tokens"),
        "windowed_mlp": (mlp, "tokens"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--attention", default="einsum")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    gpu = args.device == "gpu"
    if gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    if not gpu:
        jax.config.update("jax_platforms", "cpu")
    from sammed3d_jax.model.config import VARIANTS
    from sammed3d_jax.model.image_encoder import ImageEncoderViT3D

    dtype = "bfloat16" if gpu else "float32"
    result: dict = {"device": str(jax.devices()[0].device_kind), "dtype": dtype}
    for impl in args.attention.split(","):
        cfg = VARIANTS["vit_b_ori"].replace(dtype=dtype, attention_impl=impl)
        enc = ImageEncoderViT3D(cfg, rngs=nnx.Rngs(0))
        pieces = encoder_pieces(enc)
        for b in (int(v) for v in args.batches.split(",")):
            rng = np.random.default_rng(b)
            inputs = {
                "volume": jnp.asarray(rng.standard_normal((b, 128, 128, 128, 1)), jnp.float32),
                "tokens": jnp.asarray(rng.standard_normal((b, 8, 8, 8, 768)), jnp.float32),
            }
            graphdef, state = nnx.split(enc)
            for name, (fn, kind) in pieces.items():
                # jax.jit on the split state: nnx.jit's per-call graph traversal would add
                # milliseconds of Python time to every call and swamp the GPU figures.
                f = jax.jit(lambda st, x, fn=fn, g=graphdef: fn(nnx.merge(g, st), x))
                t = median_time(
                    lambda f=f, x=inputs[kind], s=state: f(s, x),
                    args.repeats,
                    jax.block_until_ready,
                )
                result[f"{impl}_b{b}_{name}_ms"] = 1e3 * t
                print(f"{impl} b{b} {name}: {1e3 * t:.3f} ms", file=sys.stderr, flush=True)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
