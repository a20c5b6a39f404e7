"""Weights stored in the compute dtype for inference give bitwise the same results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax import Sam3DConfig, build_sam3d
from sammed3d_jax.inference.predictor import SamEngine
from sammed3d_jax.model import compute_dtype_weights, merge_flat, split_flat
from tests.conftest import randomize_params


def _model(dtype: str, attention: str = "einsum"):
    cfg = Sam3DConfig.from_variant("tiny", dtype=dtype, attention_impl=attention)
    return randomize_params(build_sam3d(cfg), seed=3, scale=0.2)


def _outputs(model, x, points, labels, mask):
    flatdef, leaves = split_flat(model)

    @jax.jit
    def run(leaves, x, points, labels, mask):
        m = merge_flat(flatdef, leaves)
        emb = m.encode(x)
        return emb, m.decode(emb, points, labels, mask).low_res_logits

    return run(leaves, x, points, labels, mask)


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_half_precision_weights_change_no_bit(attention):
    model = _model("bfloat16", attention)
    cast = compute_dtype_weights(model)
    rng = np.random.default_rng(0)
    s, low = model.config.img_size, model.config.low_res_size
    x = jnp.asarray(rng.standard_normal((2, s, s, s)), jnp.float32)
    points = jnp.asarray(rng.uniform(0, s - 1, (2, 3, 3)), jnp.float32)
    labels = jnp.asarray([[1, 0, 1], [1, 1, -1]], jnp.int32)
    mask = jnp.asarray(rng.standard_normal((2, low, low, low)), jnp.float32)
    emb, logits = _outputs(model, x, points, labels, mask)
    emb_c, logits_c = _outputs(cast, x, points, labels, mask)
    np.testing.assert_array_equal(np.asarray(emb_c), np.asarray(emb))
    np.testing.assert_array_equal(np.asarray(logits_c), np.asarray(logits))

    leaves, cast_leaves = split_flat(model, pack=False)[1], split_flat(cast, pack=False)[1]
    assert all(a.dtype == jnp.float32 for a in leaves)  # the model itself is left alone
    half = [b for b in cast_leaves if b.dtype == jnp.bfloat16]
    assert half and len(half) < len(cast_leaves)  # LayerNorms, tables, embeddings stay f32
    qkv = cast.image_encoder.blocks[0].attn.qkv
    assert qkv.kernel[...].dtype == qkv.bias[...].dtype == jnp.bfloat16
    assert cast.image_encoder.blocks[0].norm1.scale[...].dtype == jnp.float32
    assert cast.image_encoder.blocks[0].attn.rel_pos_d[...].dtype == jnp.float32


def test_float32_models_are_returned_as_they_are():
    model = _model("float32")
    assert compute_dtype_weights(model) is model


def test_engine_keeps_the_compute_dtype_weights():
    model = _model("bfloat16")
    engine = SamEngine(model)
    kinds = {leaf.dtype for leaf in engine._leaves}
    assert kinds == {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}
    s = model.config.img_size
    roi = np.random.default_rng(1).standard_normal((s, s, s)).astype(np.float32)
    emb = engine.encode(roi)
    ref = jax.jit(lambda x: model.encode(x))(jnp.asarray(roi)[None])
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(ref))
