"""`rel_pos_attention` (the Pallas kernel that forms the relative-position bias on chip),
run in Pallas' interpreter on the CPU: the kernel against its dense reference on awkward
sizes, and `attention_impl="pallas"` against the einsum path on whole encoders (float32 to
rounding, bfloat16 as accurate, gradients through its reference backward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax.model.rel_pos_attention import reference, rel_pos_attention
from tests.model.test_attention_impl import (
    CASES,
    assert_gradients_equal_einsum,
    encode,
    float32_error_vs_einsum,
    random_encoder,
    rel,
    small_cfg,
    volume,
    with_numerics,
)


def _operands(box, n, e, g=3, padded=True, seed=0):
    d, h, w = box
    m = d * h * w
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    pad = (arr(g, n) + 2.0, arr(g, e)) if padded else (None, None)
    return arr(g, n, e), arr(g, m, e), arr(g, m, e), (arr(g, n, d * w), arr(g, n, h * w)), pad


@pytest.mark.parametrize(
    "box, n, e, padded",
    [
        ((4, 4, 4), 64, 16, True),  # one key block, block-sized queries
        ((3, 5, 2), 37, 12, True),  # 30 keys, 37 queries, head dim 12: every side padded
        ((2, 3, 3), 18, 8, False),  # no padded keys (global attention)
    ],
)
def test_kernel_matches_dense_reference(box, n, e, padded):
    q, k, v, terms, (pad, pad_value) = _operands(box, n, e, padded=padded)
    with jax.default_matmul_precision("highest"):
        out = rel_pos_attention(q, k, v, terms, pad, pad_value, scale=0.3, box=box, block_q=16)
        # The reference's own conventions: padded term widths, no padded keys as -1e30.
        g = q.shape[0]
        p = pad if padded else jnp.full((g, n), -1.0e30)
        b_v = pad_value if padded else jnp.zeros((g, e))
        ref = reference(q, k, v, *terms, p, b_v, scale=0.3, box=box)
    assert out.shape == (q.shape[0], n, e)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_keys_of_another_box():
    q, k, v, terms, (pad, pad_value) = _operands((2, 2, 2), 8, 8)
    with pytest.raises(ValueError, match="keys and values must be"):
        rel_pos_attention(q, k, v, terms, pad, pad_value, scale=1.0, box=(2, 2, 3))


@pytest.mark.parametrize(
    "case",
    [
        "one_padded_window",
        pytest.param("partial_windows", marks=pytest.mark.slow),
        pytest.param("odd_tokens", marks=pytest.mark.slow),
        pytest.param("no_rel_pos", marks=pytest.mark.slow),
        pytest.param("no_qkv_bias", marks=pytest.mark.slow),
    ],
)
def test_pallas_encoder_equals_einsum_float32(case):
    assert float32_error_vs_einsum(case, "pallas") < 1e-5


def test_pallas_encoder_bfloat16_as_accurate_as_einsum():
    img, window, extra = CASES["partial_windows"]
    enc = random_encoder(small_cfg(img, window, **extra), seed=5)
    x = volume(enc.cfg)
    with jax.default_matmul_precision("highest"):
        ref = encode(enc, x)
    err_einsum = rel(encode(with_numerics(enc, dtype="bfloat16", attention_impl="einsum"), x), ref)
    err_pallas = rel(encode(with_numerics(enc, dtype="bfloat16", attention_impl="pallas"), x), ref)
    assert err_pallas < 1.5 * err_einsum + 1e-3


@pytest.mark.slow
def test_pallas_encoder_gradients_equal_einsum():
    assert_gradients_equal_einsum("one_padded_window", "pallas")
