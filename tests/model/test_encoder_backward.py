"""The encoder's backward pass: the residual gradient is materialised between blocks."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sammed3d_jax import Sam3DConfig
from sammed3d_jax.model.common import materialize_cotangent
from sammed3d_jax.model.image_encoder import ImageEncoderViT3D


def test_materialize_cotangent_is_the_identity_both_ways():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.float32)
    np.testing.assert_array_equal(materialize_cotangent(x), x)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4)), jnp.float32)
    g = g.at[0, 0, 0].set(jnp.nan).at[1, 2, 3].set(-0.0).at[0, 1, 1].set(jnp.inf)
    _, vjp = jax.vjp(materialize_cotangent, x)
    (out,) = jax.jit(vjp)(g)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(g))  # NaN where g is NaN
    assert np.signbit(np.asarray(out)[1, 2, 3])


def _largest_fusion_operand_count(hlo: str) -> int:
    counts = [
        len(re.findall(r"%[\w.\-]+", line.split(" fusion(", 1)[1].split("), kind=", 1)[0]))
        for line in hlo.splitlines()
        if " fusion(" in line and "), kind=" in line
    ]
    return max(counts)


def _encoder_grad_hlo() -> str:
    cfg = Sam3DConfig.from_variant(
        "tiny", img_size=32, encoder_depth=8, encoder_global_attn_indexes=(3, 7)
    )
    graphdef, state = nnx.split(ImageEncoderViT3D(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((1, 32, 32, 32, 1), jnp.float32)

    def loss(st, v):
        return jnp.sum(nnx.merge(graphdef, st)(v) ** 2)

    return jax.jit(jax.grad(loss)).lower(state, x).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU fusion behaviour")
def test_cpu_backward_fusions_stay_small():
    """Without the materialisation, XLA:CPU fuses the residual gradient's whole chain of
    additions into each of its readers: fusions grow with the depth (116 operands for this
    8-block encoder, 170 for vit_b_ori's 12 blocks) and the work with its square."""
    assert _largest_fusion_operand_count(_encoder_grad_hlo()) <= 24
