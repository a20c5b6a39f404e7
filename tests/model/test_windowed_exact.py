"""The exact windowed attention equals the original's literal zero-padded windows.

`window_attention="exact"` attends over each window's real tokens plus one closed-form key
for all padded ones; `"padded"` pads the normalised grid with zeros and attends over every
token as the original does. These tests compare the two on random weights (every parameter,
the qkv bias and the relative-position tables included) for one-window and multi-window grids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sammed3d_jax import Sam3DConfig
from sammed3d_jax.model import image_encoder
from sammed3d_jax.model.image_encoder import (
    Attention,
    take_rows,
    window_partition,
    window_unpartition,
    windowed_attention_exact,
)
from tests.conftest import randomize_params


@pytest.fixture(params=["reduce", "unrolled"])
def lse_form(request, monkeypatch):
    """Both forms of the closed form's log-sum-exps (reductions on CPU, unrolled on GPU)."""
    monkeypatch.setattr(image_encoder, "unrolled_logsumexp", lambda: request.param == "unrolled")
    return request.param


def random_attention(cfg: Sam3DConfig, side: int, seed: int) -> Attention:
    return randomize_params(nnx.eval_shape(lambda: Attention(cfg, side, rngs=nnx.Rngs(0))), seed)


@functools.partial(jax.jit, static_argnums=2)
def padded_reference(attn: Attention, x: jax.Array, window: int) -> jax.Array:
    """The original's literal computation: zero-padded windows, every token attended."""
    wins, padded = window_partition(x, window)
    return window_unpartition(attn.attend_padded(wins), window, padded, x.shape[1:4])


@pytest.mark.parametrize(
    "grid, window",
    [
        (8, 14),  # vit_b_ori: one 14³ window holding an 8³ grid
        (4, 6),  # the golden "small" configuration
        (6, 4),  # 2 windows per axis: full and partial windows in every combination
        (5, 3),  # 2 windows per axis with a 2-token remainder
        (7, 7),  # no padding at all (the closed-form term must vanish)
    ],
)
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_exact_equals_padded(grid, window, qkv_bias, lse_form):
    cfg = Sam3DConfig.from_variant(
        "tiny", encoder_embed_dim=24, encoder_num_heads=2, window_size=window, qkv_bias=qkv_bias
    )
    attn = random_attention(cfg, window, seed=grid * 100 + window)
    x = jnp.asarray(
        np.random.default_rng(grid).standard_normal((2, grid, grid, grid, 24)), jnp.float32
    )
    with jax.default_matmul_precision("highest"):
        reference = padded_reference(attn, x, window)
        # A new function per call: the log-sum-exp form is chosen when tracing.
        exact = jax.jit(lambda a, x: windowed_attention_exact(a, x, window))(attn, x)
    np.testing.assert_allclose(np.asarray(exact), np.asarray(reference), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("grid, window", [(8, 14), (6, 4)])
def test_closed_form_gradients_agree_in_both_forms(grid, window, monkeypatch):
    cfg = Sam3DConfig.from_variant(
        "tiny", encoder_embed_dim=24, encoder_num_heads=2, window_size=window
    )
    attn = random_attention(cfg, window, seed=11)
    x = jnp.asarray(
        np.random.default_rng(5).standard_normal((1, grid, grid, grid, 24)), jnp.float32
    )
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

    def loss(p, x):
        out = windowed_attention_exact(nnx.merge(graphdef, p, rest), x, window)
        return jnp.sum(jnp.sin(out))

    grads = {}
    for form in ("reduce", "unrolled"):
        monkeypatch.setattr(image_encoder, "unrolled_logsumexp", lambda f=form: f == "unrolled")
        with jax.default_matmul_precision("highest"):
            grads[form] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for a, b in zip(
        jax.tree.leaves(grads["reduce"]), jax.tree.leaves(grads["unrolled"]), strict=True
    ):
        scale = float(jnp.abs(a).max()) or 1.0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5 * scale)


def test_exact_handles_peaked_relative_positions(lse_form):
    """Large relative-position logits: the log-space closed form must not over/underflow."""
    cfg = Sam3DConfig.from_variant(
        "tiny", encoder_embed_dim=24, encoder_num_heads=2, window_size=14
    )
    attn = random_attention(cfg, 14, seed=7)
    for name in ("rel_pos_d", "rel_pos_h", "rel_pos_w"):
        table = getattr(attn, name)
        table.value = table.value * 20.0
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 8, 8, 8, 24)) * 3, jnp.float32)
    with jax.default_matmul_precision("highest"):
        reference = padded_reference(attn, x, 14)
        exact = jax.jit(lambda a, x: windowed_attention_exact(a, x, 14))(attn, x)
    assert np.isfinite(np.asarray(exact)).all()
    scale = np.abs(np.asarray(reference)).max()
    assert np.abs(np.asarray(exact) - np.asarray(reference)).max() <= 1e-4 * scale


def test_exact_attends_to_far_fewer_keys():
    """For vit_b_ori the exact form evaluates 512 x 513 logits instead of 2744 x 2744."""
    cfg = Sam3DConfig.from_variant("vit_b_ori")
    attn = nnx.eval_shape(lambda: Attention(cfg, 14, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((1, 8, 8, 8, 768), jnp.float32)
    exact = jax.jit(lambda a, x: windowed_attention_exact(a, x, 14)).lower(attn, x).cost_analysis()
    padded = (
        jax.jit(
            lambda a, x: window_unpartition(
                a.attend_padded(window_partition(x, 14)[0]), 14, (14, 14, 14), (8, 8, 8)
            )
        )
        .lower(attn, x)
        .cost_analysis()
    )
    exact = exact[0] if isinstance(exact, list) else exact
    padded = padded[0] if isinstance(padded, list) else padded
    assert exact["flops"] < padded["flops"] / 3


def _rel_pos_indices(n: int, extent: int, s: int) -> list[np.ndarray]:
    """The three index patterns of the relative-position terms (see Attention._rel_terms)."""
    x = np.arange(extent)
    return [
        (np.arange(n)[:, None] - x[None, :] + s - 1)[:, None, None, :],
        (np.arange(n)[:, None] - x[None, :] + s - 1)[None, :, None, :],
        (x[:, None] - x[None, :] + s - 1)[None, None],
    ]


@pytest.mark.parametrize("n, extent, s", [(8, 14, 14), (4, 6, 6), (8, 8, 8), (3, 4, 4)])
def test_take_rows_and_its_gather_backward_equal_take_along_axis(n, extent, s):
    rng = np.random.default_rng(n + extent)
    for idx in _rel_pos_indices(n, extent, s):
        values = jnp.asarray(rng.standard_normal((2, 3, n, n, extent, 2 * s - 1)), jnp.float32)
        weights = jnp.asarray(rng.standard_normal((2, 3, n, n, extent, extent)), jnp.float32)
        idx_full = jnp.asarray(idx)[None, None]

        def plain(v, idx_full=idx_full, weights=weights):
            return jnp.sum(jnp.take_along_axis(v, idx_full, axis=-1) * weights)

        def ours(v, idx=idx, weights=weights):
            return jnp.sum(take_rows(v, idx) * weights)

        np.testing.assert_array_equal(
            np.asarray(take_rows(values, idx)),
            np.asarray(jnp.take_along_axis(values, idx_full, axis=-1)),
        )
        np.testing.assert_array_equal(
            np.asarray(jax.grad(ours)(values)), np.asarray(jax.grad(plain)(values))
        )


def test_take_rows_under_jit_in_bfloat16():
    idx = _rel_pos_indices(4, 6, 6)[2]
    values = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 4, 6, 11)), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(take_rows(v, idx).astype(jnp.float32) ** 2)))
    plain = jax.grad(
        lambda v: jnp.sum(
            jnp.take_along_axis(v, jnp.asarray(idx)[None], -1).astype(jnp.float32) ** 2
        )
    )
    g = grad(values)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(plain(values), np.float32))


@pytest.mark.parametrize(
    "idx, match",
    [
        ([[0, 1, 1]], "repeats"),
        ([[4, -1]], r"\[0, 5\)"),
        ([[0, 5]], r"\[0, 5\)"),
        ([[[1, 2]], [[1, 2]], [[1, 2]]], "index shape"),
        ([[1, 2], [2, 3], [0, 1]], "does not broadcast"),
    ],
)
def test_take_rows_rejects_bad_indices(idx, match):
    with pytest.raises(ValueError, match=match):
        take_rows(jnp.zeros((2, 5)), np.array(idx))
