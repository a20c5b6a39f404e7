"""Attention with SAM-Med3D's decomposed relative-position bias formed inside the kernel.

The fused-attention path (`Attention._attend_fused`) hands cuDNN a bias of one value per
(query, key) pair, (B, K, n, m), assembled in memory for every block: at batch 32 that
assembly is the encoder's largest non-matmul cost. The bias has few degrees of freedom per
query: for a key at (kd, kh, kw) of the real box (d, h, w),

    bias[q, key] = a[q, kw] + b[q, kd, kw] + c[q, kh, kw] = ab[q, kd, kw] + c[q, kh, kw]

(see `RelPosTerms`; ab = a + b), i.e. the product of a per-query row of d*w + h*w term
values with a 0/1 matrix that depends on the key index alone. This kernel takes the
per-query rows (``tb`` = ab, ``tc`` = c) and builds the 0/1 matrices from the key indices on
chip, adding the two products to the q.k logits of each key block; the padded keys of a window enter as the
online softmax's starting state (their summed weight e^pad, their common value b_v), in
float32.

A Pallas kernel (Triton on NVIDIA GPUs). Elsewhere it runs in Pallas' interpreter, which is
slow and meant for tests. Its backward pass is the dense reference's (`reference`), so the
kernel can sit in a differentiated program, but it is meant for inference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
F32 = jnp.float32
_MASKED = -1.0e30  # logit of keys that do not exist (finite: exp of a difference stays 0)


def _pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): Triton's block sides are powers of two and
    its matrix products need sides >= 16."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def _pad_to(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _key_onehots(j: Array, box: tuple[int, int, int], widths: tuple[int, int], dtype):
    """0/1 matrices (W, BK) mapping each term column to the keys with index j it applies to."""
    _, h, w = box
    kd, kh, kw = j // (h * w), (j // w) % h, j % w
    cols = [kd * w + kw, kh * w + kw]
    return [
        (jnp.arange(width)[:, None] == col[None, :]).astype(dtype)
        for width, col in zip(widths, cols, strict=True)
    ]


def _kernel(q_ref, k_ref, v_ref, tb_ref, tc_ref, pad_ref, bv_ref, o_ref, **static):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    scale, box, n_keys, block_k = (
        static["scale"],
        static["box"],
        static["n_keys"],
        static["block_k"],
    )
    q = plgpu.load(q_ref)
    terms = [plgpu.load(tb_ref), plgpu.load(tc_ref)]
    # float32 operands (the parity mode) in full precision, not TF32.
    dot = functools.partial(plgpu.dot, allow_tf32=False) if q.dtype == F32 else plgpu.dot
    widths = tuple(t.shape[-1] for t in terms)
    block_q = q.shape[0]
    # The padded keys first: summed weight e^pad (so l = 1 at m = pad), common value b_v.
    m_i = plgpu.load(pad_ref)
    l_i = jnp.ones((block_q,), F32)
    acc = jnp.broadcast_to(plgpu.load(bv_ref)[None, :], (block_q, q.shape[1])).astype(F32)

    def body(step, carry):
        acc, m_i, l_i = carry
        keys = pl.dslice(step * block_k, block_k)
        k = plgpu.load(k_ref.at[keys, :])
        s = dot(q, k.T) * scale
        j = step * block_k + jnp.arange(block_k)
        for t, onehot in zip(terms, _key_onehots(j, box, widths, q.dtype), strict=True):
            s = s + dot(t, onehot)
        s = jnp.where((j < n_keys)[None, :], s, _MASKED)
        m_next = jnp.maximum(m_i, jnp.max(s, axis=1))
        correction = jnp.exp(m_i - m_next)
        p = jnp.exp(s - m_next[:, None])
        v = plgpu.load(v_ref.at[keys, :])
        acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_next, l_i * correction + jnp.sum(p, axis=1)

    acc, m_i, l_i = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, (acc, m_i, l_i))
    plgpu.store(o_ref, (acc / l_i[:, None]).astype(o_ref.dtype))


def reference(q, k, v, tb, tc, pad, bv, *, scale: float, box: tuple[int, int, int]):
    """The same attention with the bias and the padded keys' logit written out (dense)."""
    d, h, w = box
    m = d * h * w
    j = jnp.arange(m)
    widths = (tb.shape[-1], tc.shape[-1])
    logits = jnp.einsum("bqe,bke->bqk", q, k[:, :m], preferred_element_type=F32) * scale
    for t, onehot in zip((tb, tc), _key_onehots(j, box, widths, F32), strict=True):
        logits = logits + jnp.einsum("bqr,rk->bqk", t.astype(F32), onehot)
    logits = jnp.concatenate([logits, pad[..., None]], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bqk,bke->bqe", probs[..., :m], v[:, :m].astype(F32))
    return (out + probs[..., m:] * bv[:, None, :]).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attention(q, k, v, tb, tc, pad, bv, scale, box, block_q, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    g, n, e = q.shape
    m = k.shape[1]
    block_k = min(64, m)
    kernel = functools.partial(
        _kernel, scale=scale, box=box, n_keys=int(np.prod(box)), block_k=block_k
    )

    def rows(width):  # one block of query rows of a (G, n, width) operand
        return pl.BlockSpec((None, block_q, width), lambda i, j: (i, j, 0))

    def whole(width):
        return pl.BlockSpec((None, m, width), lambda i, j: (i, 0, 0))

    return pl.pallas_call(
        kernel,
        grid=(g, n // block_q),
        in_specs=[
            rows(e),
            whole(e),
            whole(e),
            rows(tb.shape[-1]),
            rows(tc.shape[-1]),
            pl.BlockSpec((None, block_q), lambda i, j: (i, j)),
            pl.BlockSpec((None, e), lambda i, j: (i, 0)),
        ],
        out_specs=rows(e),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="rel_pos_attention",
    )(q, k, v, tb, tc, pad, bv)


def _attention_fwd(q, k, v, tb, tc, pad, bv, scale, box, block_q, interpret):
    out = _attention(q, k, v, tb, tc, pad, bv, scale, box, block_q, interpret)
    return out, (q, k, v, tb, tc, pad, bv)


def _attention_bwd(scale, box, block_q, interpret, res, g):
    _, vjp = jax.vjp(functools.partial(reference, scale=scale, box=box), *res)
    return vjp(g)


_attention.defvjp(_attention_fwd, _attention_bwd)


def rel_pos_attention(
    q: Array,
    k: Array,
    v: Array,
    terms: tuple[Array, Array],
    pad_logit: Array | None,
    pad_value: Array | None,
    *,
    scale: float,
    box: tuple[int, int, int],
    block_q: int = 64,
    interpret: bool | None = None,
) -> Array:
    """Softmax attention over the real keys of a (d, h, w) box plus optional padded keys.

    Args:
      q, k, v: (G, n, E), (G, m, E), (G, m, E) with m = d * h * w keys in (d, h, w) order.
      terms: per-query term rows ab (G, n, d * w) and c (G, n, h * w): the bias of key
        (kd, kh, kw) is ab[kd * w + kw] + c[kh * w + kw].
      pad_logit: (G, n) float32 log of the padded keys' summed weight, or None (no padding).
      pad_value: (G, E) the padded keys' common value (with ``pad_logit``).
      scale: factor of the q.k products (not of the terms).
      interpret: run in Pallas' interpreter (default: unless the backend is a GPU).

    Returns:
      (G, n, E) in q's dtype.
    """
    g, n, e = q.shape
    d, h, w = box
    m = d * h * w
    if k.shape != (g, m, e) or v.shape != (g, m, e):
        raise ValueError(f"keys and values must be {(g, m, e)} for box {box}, got {k.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    dt = q.dtype
    n_pad, m_pad, e_pad = -(-n // block_q) * block_q, _pow2(m), _pow2(e)
    widths = (_pow2(d * w), _pow2(h * w))
    if pad_logit is None:
        pad_logit = jnp.full((g, n), _MASKED, F32)
        pad_value = jnp.zeros((g, e), F32)

    def rows(x: Array, length: int, width: int) -> Array:
        return _pad_to(_pad_to(x, 1, length), 2, width).astype(dt)

    out = _attention(
        rows(q, n_pad, e_pad),
        rows(k, m_pad, e_pad),
        rows(v, m_pad, e_pad),
        *(rows(t, n_pad, width) for t, width in zip(terms, widths, strict=True)),
        _pad_to(pad_logit.astype(F32), 1, n_pad),
        _pad_to(pad_value.astype(F32), 1, e_pad),
        float(scale),
        (int(d), int(h), int(w)),
        int(block_q),
        bool(interpret),
    )
    return out[:, :n, :e]
