"""Convolutions as matmuls (non-overlapping patches, stride-1 "same" kernels, the
transposed convolution) equal their definitions, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sammed3d_jax.model.common import ConvTranspose3dK2, PatchConv3d, SameConv3d, conv3d


def _check(module, reference, x, weights):
    """``module(x)`` = ``reference(x, kernel, bias)`` and the gradients of ``sum(out · w)``."""
    graphdef, state = nnx.split(module)

    def ours(x, kernel, bias):
        return nnx.merge(graphdef, nnx.State({"kernel": kernel, "bias": bias}))(x)

    args = (x, state["kernel"][...], state["bias"][...])
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(ours(*args), reference(*args), rtol=1e-5, atol=1e-5)
        grads = [
            jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(*args)
            for f in (ours, reference)
        ]
    for name, a, r in zip(("x", "kernel", "bias"), *grads, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-4, err_msg=name)


@pytest.mark.parametrize(("p", "cin", "cout"), [(1, 16, 24), (2, 1, 4), (2, 4, 16), (4, 3, 5)])
def test_patch_conv_equals_strided_convolution(p, cin, cout):
    conv = conv3d(cin, cout, p, stride=p, dtype=jnp.float32, rngs=nnx.Rngs(p))
    assert isinstance(conv, PatchConv3d)

    def reference(x, kernel, bias):
        dims = ("NDHWC", "DHWIO", "NDHWC")
        y = jax.lax.conv_general_dilated(x, kernel, (p, p, p), "VALID", dimension_numbers=dims)
        return y + bias

    rng = np.random.default_rng(p)
    x = jnp.asarray(rng.standard_normal((2, 4 * p, 2 * p, 3 * p, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 4, 2, 3, cout)), jnp.float32)
    _check(conv, reference, x, w)


@pytest.mark.parametrize(("k", "cin", "cout"), [(3, 5, 7), (5, 3, 4)])
def test_same_conv_equals_padded_convolution(k, cin, cout):
    """The tap-matmul form (the CPU path) against XLA's convolution with zero padding, on a
    box whose sides differ (so a transposed axis would show)."""
    assert jax.default_backend() == "cpu"
    conv = conv3d(cin, cout, k, padding=k // 2, dtype=jnp.float32, rngs=nnx.Rngs(k))
    assert isinstance(conv, SameConv3d)

    def reference(x, kernel, bias):
        dims = ("NDHWC", "DHWIO", "NDHWC")
        pad = ((k // 2, k // 2),) * 3
        return jax.lax.conv_general_dilated(x, kernel, (1,) * 3, pad, dimension_numbers=dims) + bias

    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((2, 4, 6, 3, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 4, 6, 3, cout)), jnp.float32)
    _check(conv, reference, x, w)


def test_other_convolutions_stay_general():
    for kernel, stride, padding in ((3, 1, 0), (2, 1, 0), (2, 2, 1), (3, 2, 1)):
        conv = conv3d(
            4, 4, kernel, stride=stride, padding=padding, dtype=jnp.float32, rngs=nnx.Rngs(0)
        )
        assert type(conv) is nnx.Conv


def test_conv_transpose_equals_its_definition():
    """out[b, 2d+a, 2h+e, 2w+g, o] = bias[o] + sum_i x[b, d, h, w, i] W[a, e, g, i, o]."""
    up = ConvTranspose3dK2(6, 5, dtype=jnp.float32, rngs=nnx.Rngs(0))

    def reference(x, kernel, bias):
        return jnp.einsum("bdhwi,aegio->bdahewgo", x, kernel).reshape(2, 6, 8, 10, 5) + bias

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 6, 8, 10, 5)), jnp.float32)
    _check(up, reference, x, w)
