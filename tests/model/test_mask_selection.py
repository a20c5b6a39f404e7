"""The mask decoder computes only the mask tokens it returns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sammed3d_jax import Sam3DConfig, build_sam3d


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(build_sam3d(Sam3DConfig.from_variant("tiny"), seed=3))


def _decoder_inputs(m, b=2):
    cfg = m.config
    g, c = cfg.grid_size, cfg.prompt_embed_dim
    keys = jax.random.split(jax.random.key(0), 3)
    emb = jax.random.normal(keys[0], (b, g, g, g, c))
    pts = jax.random.uniform(keys[1], (b, 2, 3), maxval=cfg.img_size)
    labels = jnp.array([[1, 0]] * b, jnp.int32)
    low = jax.random.normal(keys[2], (b, *(cfg.low_res_size,) * 3))
    sparse, dense, valid = m.prompt_encoder((pts, labels), low)
    return emb, m.prompt_encoder.get_dense_pe(), sparse, dense, valid


def test_selected_masks_equal_the_full_decode(split_model):
    graphdef, state = split_model

    @jax.jit
    def decode(state):
        m = nnx.merge(graphdef, state)
        emb, pe, sparse, dense, valid = _decoder_inputs(m)
        single = m.mask_decoder(emb, pe, sparse, dense, False, sparse_mask=valid)
        multi = m.mask_decoder(emb, pe, sparse, dense, True, sparse_mask=valid)
        return single, multi, m.mask_decoder.predict_masks(emb, pe, sparse, dense, valid)

    single, multi, (all_masks, all_iou) = decode(state)
    for (masks, iou), sl, n in ((single, slice(0, 1), 1), (multi, slice(1, None), 3)):
        assert masks.shape[1] == n and iou.shape[1] == n
        np.testing.assert_allclose(np.asarray(masks), np.asarray(all_masks[:, sl]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(iou), np.asarray(all_iou[:, sl]), atol=1e-5)


def test_single_mask_pass_does_not_touch_the_other_hypernetworks(split_model):
    # NaN weights in hypernetworks 1..3: a single-mask decode (the training step's passes)
    # must neither read them in its output nor in its gradient.
    graphdef, state = split_model
    state = jax.tree.map(lambda x: x, state)
    mlps = state["mask_decoder"]["output_hypernetworks_mlps"]
    for i in (1, 2, 3):
        mlps[i] = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), mlps[i])

    @jax.jit
    @jax.value_and_grad
    def loss(state):
        m = nnx.merge(graphdef, state)
        emb, pe, sparse, dense, valid = _decoder_inputs(m)
        masks, _ = m.mask_decoder(emb, pe, sparse, dense, False, sparse_mask=valid)
        return jnp.sum(masks**2)

    value, grads = loss(state)
    assert np.isfinite(float(value))
    transformer_grads = jax.tree.leaves(grads["mask_decoder"]["transformer"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in transformer_grads)
