"""The decoder's token/image cross-attention without projecting the image side
(`DownscaleAttention`'s few-query and few-key paths) equals the projected original."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sammed3d_jax.model import transformer
from sammed3d_jax.model.transformer import DownscaleAttention


def _attention(seed: int = 0) -> DownscaleAttention:
    attn = DownscaleAttention(48, 4, 2, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    # Non-zero biases everywhere: the regrouping moves each of them.
    rng = np.random.default_rng(seed)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
        lin.bias[...] = jnp.asarray(rng.standard_normal(lin.bias.shape), jnp.float32)
    return attn


def _inputs(tq: int, tk: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((2, t, 48)), jnp.float32) for t in (tq, tk, tk))
    return q, k + 0.5, v


@pytest.mark.parametrize("tq,tk", [(3, 40), (40, 3)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("blocks", [False, True])  # per-head products (CPU) / blocks (GPU)
def test_regrouped_paths_equal_the_projected_one(tq, tk, masked, blocks, monkeypatch):
    monkeypatch.setattr(transformer, "heads_as_blocks", lambda: blocks)
    attn = _attention()
    q, k, v = _inputs(tq, tk)
    mask = None
    if masked:
        mask = jnp.asarray(np.arange(tk)[None, :] < np.array([[tk - 1], [tk // 2]]))
    assert 4 * min(tq, tk) < attn.internal  # the regrouped path is taken
    with jax.default_matmul_precision("highest"):
        got = attn(q, k, v, mask)
        want = attn._projected(q, k, v, mask)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

        def loss(model, q, k, v, path):
            return jnp.sum(jnp.sin(getattr(model, path)(q, k, v, mask)))

        g_got = nnx.grad(loss, argnums=(0, 1, 2, 3))(attn, q, k, v, "__call__")
        g_want = nnx.grad(loss, argnums=(0, 1, 2, 3))(attn, q, k, v, "_projected")
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_token_self_attention_keeps_the_projected_path():
    attn = _attention()
    q, _, _ = _inputs(5, 5)
    jaxpr = str(jax.make_jaxpr(lambda x: attn(x, x, x))(q))
    want = str(jax.make_jaxpr(lambda x: attn._projected(x, x, x, None))(q))
    assert jaxpr == want
