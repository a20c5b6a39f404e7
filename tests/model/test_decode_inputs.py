"""`Sam3D.decode` names the argument whose shape is wrong instead of failing inside jax."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from sammed3d_jax import Sam3DConfig, build_sam3d


@pytest.fixture(scope="module")
def model():
    return build_sam3d(Sam3DConfig.from_variant("tiny"))


def _inputs(cfg, b=1, n=3):
    g, low = cfg.grid_size, cfg.low_res_size
    return dict(
        image_embeddings=jnp.zeros((b, g, g, g, cfg.prompt_embed_dim)),
        points=jnp.ones((b, n, 3)),
        labels=jnp.ones((b, n), jnp.int32),
        mask_input=jnp.zeros((b, low, low, low)),
    )


def test_good_inputs_decode(model):
    out = model.decode(**_inputs(model.config, b=2), point_mask=jnp.ones((2, 3), bool))
    low = model.config.low_res_size
    assert out.low_res_logits.shape == (2, 1, low, low, low)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i, c: {"points": jnp.ones((1, 3, 2))}, "points must have shape"),
        (lambda i, c: {"points": jnp.ones((3, 3)), "labels": jnp.ones(3)}, "points must have"),
        (lambda i, c: {"labels": jnp.ones((1, 2))}, "labels must have shape"),
        (lambda i, c: {"mask_input": jnp.zeros((1, 8, 8, 8))}, "mask_input must have shape"),
        (lambda i, c: {"mask_input": jnp.zeros((2, *i["mask_input"].shape[1:]))}, "differ"),
        (lambda i, c: {"image_embeddings": i["image_embeddings"][:, :2]}, "image_embeddings"),
        (lambda i, c: {"point_mask": jnp.ones((1, 2), bool)}, "point_mask must have shape"),
    ],
)
def test_bad_shapes_are_named(model, change, message):
    inputs = _inputs(model.config)
    inputs.update(change(inputs, model.config))
    with pytest.raises(ValueError, match=message):
        model.decode(**inputs)
