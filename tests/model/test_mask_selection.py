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


def _decoder_inputs(m, b=2, n_points=2):
    cfg = m.config
    g, c = cfg.grid_size, cfg.prompt_embed_dim
    keys = jax.random.split(jax.random.key(0), 3)
    emb = jax.random.normal(keys[0], (b, g, g, g, c))
    pts = jax.random.uniform(keys[1], (b, n_points, 3), maxval=cfg.img_size)
    labels = jnp.array([[1, 0, 1, 1][:n_points]] * b, jnp.int32)
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


@pytest.mark.parametrize("with_mask, n_points", [(True, 1), (False, 1), (True, 4)])
def test_filler_tokens_change_nothing(split_model, monkeypatch, with_mask, n_points):
    """GPUs pad the decoder's tokens to a multiple of 8 with masked fillers (and map the
    cross-attention's heads through block-diagonal matrices): the masks, the IoU, the
    returned tokens and the gradients are those of the unpadded decode."""
    from sammed3d_jax.model import mask_decoder, transformer

    graphdef, state = split_model

    def run(multiple):
        monkeypatch.setattr(mask_decoder, "token_multiple", lambda: multiple)
        monkeypatch.setattr(transformer, "heads_as_blocks", lambda: multiple > 1)

        def loss(state):
            m = nnx.merge(graphdef, state)
            emb, pe, sparse, dense, valid = _decoder_inputs(m, n_points=n_points)
            assert (5 + sparse.shape[1]) % 8  # five output tokens: fillers are needed
            masks, iou, inter = m.mask_decoder.predict_masks(
                emb, pe, sparse, dense, valid if with_mask else None, return_intermediates=True
            )
            value = jnp.mean(jnp.tanh(masks)) + jnp.mean(iou**2)
            return value, (masks, iou, inter["transformer_queries"])

        with jax.default_matmul_precision("highest"):
            # A new function per call: the padding is chosen when tracing.
            return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

    (_, plain), g_plain = run(1)
    (_, padded), g_padded = run(8)
    assert padded[2].shape == plain[2].shape  # fillers are cropped from the tokens
    for a, b in zip(plain, padded, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    # Against the largest gradient: some leaves' gradients are zero up to rounding (a key
    # bias shifts every logit of a softmax row alike).
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g_plain))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_padded), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * scale)
