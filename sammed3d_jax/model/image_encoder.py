"""3D ViT image encoder (`ImageEncoderViT3D` of the original), channels-last.

Token grids are ``(B, D, H, W, C)``: D, H, W are the volume's tensor axes A0, A1, A2.

Relative positions. The original adds its three decomposed relative-position terms with
2-D-style indexing on 7-D logits, so they broadcast onto other key axes than their names
suggest. What it computes, for a query at grid position (i, j, l) and a key at (a, b, c) of a
cubic grid or window of side S with tables T_d, T_h, T_w of length 2S - 1, is

    bias = q(i,j,l).T_d[i-c+S-1] + q(i,j,a).T_h[j-c+S-1] + q(i,j,b).T_w[b-c+S-1]

where q(i,j,x) is the (unscaled) query vector at grid position (i, j, x). This module
reproduces that exactly (the golden outputs of the original require it).

Windowed blocks. The original zero-pads the *normalised* token grid up to a multiple of the
window size and attends inside each window over every token, padding included. A padded
token is the zero vector, so its query, key and value are the qkv bias. `window_attention=
"padded"` runs those literal windows. `"exact"` attends over the real tokens of each window
only, plus one extra key that stands for all padded keys at once: they share the value b_v,
and their summed softmax weight is a closed form because the bias above factorises per key
column c:

    sum_pad e^{logit} = e^{s q.b_k} sum_{(a,b,c) padded} e^{A_c} e^{B_ac} e^{C_bc}

with A, B, C the three terms above. Splitting the padded set into {c padded},
{c real, a padded} and {c, a real, b padded} turns it into three sums over c of products of
per-column sums over a and over b, all of positive terms, evaluated in log space. Both modes
give the same output (tested); "exact" does a fraction of the work (512 instead of 2,744 keys
for `vit_b_ori`).

Kernels. `attention_impl="einsum"` writes the logits out and applies a float32 softmax (the
reference). "xla" and "cudnn" hand queries, keys, values and the bias to
`jax.nn.dot_product_attention` (cuDNN's fused kernel on NVIDIA GPUs); there the padded keys'
closed-form weight enters as three or four extra keys (whichever makes the key count even,
as cuDNN needs) of value b_v whose bias logits split it, so a bfloat16 bias keeps it
accurate. "auto" (default) picks "cudnn" for bfloat16/float16 on an NVIDIA GPU and "einsum"
otherwise.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sammed3d_jax.model.common import (
    LayerNorm,
    MLPBlock,
    conv3d,
    gelu,
    linear,
    materialize_cotangent,
)
from sammed3d_jax.model.config import Sam3DConfig
from sammed3d_jax.model.rel_pos_attention import rel_pos_attention
from sammed3d_jax.sharding import shard

Array = jax.Array
F32 = jnp.float32
TOKEN_AXES = ("batch", None, None, None, "act_embed")  # logical axes of (B, D, H, W, C) grids


class PatchEmbed3D(nnx.Module):
    """Non-overlapping patch embedding: Conv3d with kernel = stride = patch size.

    Computed as a reshape into patches and one matmul (:func:`patch_conv`: the arithmetic of
    the VALID strided convolution, fast on every backend).
    """

    def __init__(self, cfg: Sam3DConfig, *, rngs: nnx.Rngs):
        self.proj = conv3d(
            cfg.in_chans,
            cfg.encoder_embed_dim,
            cfg.patch_size,
            stride=cfg.patch_size,
            dtype=cfg.compute_dtype,
            rngs=rngs,
        )
        self.patch_size = cfg.patch_size

    def __call__(self, x: Array) -> Array:
        """x: (B, D, H, W, C_in) -> (B, D/p, H/p, W/p, C)."""
        return self.proj(x)


def take_rows(values: Array, idx: np.ndarray) -> Array:
    """``take_along_axis(values, idx, -1)`` for a static index whose rows never repeat an
    entry, with a gather as its backward pass.

    idx: (..., X) integers in [0, values.shape[-1]), broadcast against values' leading axes
    from the right. Since no index repeats within a row, the gradient of values is the
    output gradient gathered back (zero where no output took the entry) rather than a
    scatter-add. Reverse mode only (a custom VJP): ``jax.jvp`` through it is not supported.
    """
    idx = np.asarray(idx)
    size = values.shape[-1]
    if idx.ndim > values.ndim or idx.size == 0:
        raise ValueError(f"take_rows: index shape {idx.shape} for values {values.shape}")
    lead = values.shape[values.ndim - idx.ndim : -1]
    if any(i not in (1, v) for i, v in zip(idx.shape[:-1], lead, strict=True)):
        raise ValueError(f"take_rows: index shape {idx.shape} does not broadcast to {values.shape}")
    if idx.min() < 0 or idx.max() >= size:
        raise ValueError(f"take_rows: indices must lie in [0, {size})")
    ordered = np.sort(idx, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise ValueError("take_rows: an index row repeats an entry")
    inverse = np.full((*idx.shape[:-1], size), -1)
    rows = np.indices(idx.shape[:-1])
    for x in range(idx.shape[-1]):
        inverse[(*rows, idx[..., x])] = x
    pad = (1,) * (values.ndim - idx.ndim)
    idx_j = jnp.asarray(idx).reshape(pad + idx.shape)
    taken = inverse >= 0
    inverse_j = jnp.asarray(np.where(taken, inverse, 0)).reshape(pad + inverse.shape)
    taken_j = jnp.asarray(taken).reshape(inverse_j.shape)
    # Static, checked indices: no bounds masking in the gathers.
    take = functools.partial(jnp.take_along_axis, axis=-1, mode="promise_in_bounds")

    @jax.custom_vjp
    def gather(v: Array) -> Array:
        return take(v, idx_j)

    def fwd(v: Array) -> tuple[Array, None]:
        return gather(v), None

    def bwd(_, g: Array) -> tuple[Array]:
        return (jnp.where(taken_j, take(g, inverse_j), jnp.zeros((), g.dtype)),)

    gather.defvjp(fwd, bwd)
    return gather(values)


class RelPosTerms(nnx.Pytree):
    """The three relative-position terms of one attention call (see module docstring).

    a: (B, K, nd, nh, nw, X) first term per query and key column c.
    b: (B, K, nd, nh, X, X) second term, indexed [.., key row a, key column c].
    c: (B, K, nd, nh, X, X) third term, indexed [.., key row b, key column c].
    """

    def __init__(self, a: Array, b: Array, c: Array):
        self.a, self.b, self.c = a, b, c

    def bias(self, kd: int, kh: int, kw: int) -> Array:
        """Bias over the key box [0,kd) x [0,kh) x [0,kw): (B, K, nd, nh, nw, kd, kh, kw)."""
        return self.a[..., None, None, :kw] + self.row_bias(kd, kh, kw)

    def row_bias(self, kd: int, kh: int, kw: int) -> Array:
        """The second and third terms, which do not depend on the query's column:
        (B, K, nd, nh, 1, kd, kh, kw)."""
        b = self.b[:, :, :, :, None, :kd, None, :kw]
        c = self.c[:, :, :, :, None, None, :kh, :kw]
        return b + c


class Attention(nnx.Module):
    """Multi-head self-attention with the original's decomposed relative positions."""

    def __init__(self, cfg: Sam3DConfig, input_size: int, *, rngs: nnx.Rngs):
        dim = cfg.encoder_embed_dim
        self.num_heads = cfg.encoder_num_heads
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dtype = cfg.compute_dtype
        self.qkv = linear(
            dim, 3 * dim, axes=("embed", "qkv"), dtype=self.dtype, rngs=rngs, use_bias=cfg.qkv_bias
        )
        self.proj = linear(dim, dim, axes=("heads", "embed"), dtype=self.dtype, rngs=rngs)
        self.use_rel_pos = cfg.use_rel_pos
        self.attention_impl = cfg.attention_impl
        self.input_size = input_size
        if self.use_rel_pos:
            shape = (2 * input_size - 1, self.head_dim)
            self.rel_pos_d = nnx.Param(jnp.zeros(shape, F32), logical_axes=(None, None))
            self.rel_pos_h = nnx.Param(jnp.zeros(shape, F32), logical_axes=(None, None))
            self.rel_pos_w = nnx.Param(jnp.zeros(shape, F32), logical_axes=(None, None))

    def _qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """x: (B, d, h, w, C) -> q, k, v each (B, K, d, h, w, E)."""
        b, d, h, w, _ = x.shape
        qkv = self.qkv(x.astype(self.dtype)).reshape(b, d, h, w, 3, self.num_heads, self.head_dim)
        qkv = qkv.transpose(4, 0, 5, 1, 2, 3, 6)
        return qkv[0], qkv[1], qkv[2]

    def _bias_parts(self) -> tuple[Array, Array, Array]:
        """q, k and v parts of the qkv bias, (K, E) each, float32: what every zero (padding)
        token projects to."""
        if not self.qkv.use_bias:
            z = jnp.zeros((self.num_heads, self.head_dim), F32)
            return z, z, z
        # Rounded to the compute dtype first: the matmul adds the bias in that dtype, so a
        # zero token's projection is the rounded bias (bfloat16 in a bfloat16 model).
        bias = self.qkv.bias[...].astype(self.dtype).astype(F32)
        bias = bias.reshape(3, self.num_heads, self.head_dim)
        return bias[0], bias[1], bias[2]

    def _rel_terms(self, q: Array, extent: int) -> RelPosTerms:
        """Relative-position terms for real queries q (B, K, nd, nh, nw, E).

        `extent` is the key side X (window side, or the grid side for global attention).
        Query vectors at w-positions >= nw (padding) are the q bias.

        Every term is a query's dot product with one row of a table, so all of them come
        from one matmul of the queries with the three tables' 3(2s - 1) rows, followed by
        gathers of the rows each (query, key) pair needs: one small GEMM instead of three
        batched ones over transposed copies of q.
        """
        b, k, nd, nh, nw, e = q.shape
        s = self.input_size
        r = 2 * s - 1
        tables = jnp.concatenate(
            [self.rel_pos_d[...], self.rel_pos_h[...], self.rel_pos_w[...]], axis=0
        ).astype(F32)
        q = q.astype(F32)
        if extent > nw:  # padded query positions along w are zero tokens: their q is the bias
            pad = jnp.broadcast_to(
                self._bias_parts()[0][None, :, None, None, None, :], (b, k, nd, nh, extent - nw, e)
            )
            q = jnp.concatenate([q, pad], axis=4)
        qt = jnp.einsum("bkijle,re->bkijlr", q, tables)  # (B, K, nd, nh, extent, 3r)
        qt_d, qt_h, qt_w = qt[..., :nw, :r], qt[..., r : 2 * r], qt[..., 2 * r :]
        x = np.arange(extent)
        # a[.., i, j, l, x] = q(i,j,l).T_d[i - x + s - 1]
        idx_d = (np.arange(nd)[:, None] - x[None, :] + s - 1)[:, None, None, :]
        # b[.., i, j, y, x] = q(i,j,y).T_h[j - x + s - 1]
        idx_h = (np.arange(nh)[:, None] - x[None, :] + s - 1)[:, None, :]
        # c[.., i, j, y, x] = q(i,j,y).T_w[y - x + s - 1]
        idx_w = x[:, None] - x[None, :] + s - 1
        a = take_rows(qt_d, idx_d)
        bt = take_rows(qt_h, idx_h[None])
        ct = take_rows(qt_w, idx_w[None, None])
        return RelPosTerms(a, bt, ct)

    def _logits(self, q: Array, k: Array, extent: int) -> tuple[Array, RelPosTerms | None]:
        """Logits (B, K, n, n) float32 of q (B, K, d, h, w, E) against k, with the
        relative-position bias for keys on a side-`extent` window, and its terms."""
        b, heads, d, h, w, e = q.shape
        n = d * h * w
        qs = q * self.scale
        if not self.use_rel_pos or qs.dtype != F32:
            logits = jnp.einsum(
                "bkxe,bkye->bkxy",
                qs.reshape(b, heads, n, e),
                k.reshape(b, heads, n, e),
                preferred_element_type=F32,
            ).astype(F32)
            if not self.use_rel_pos:
                return logits, None
            terms = self._rel_terms(q, extent)
            return logits + terms.bias(d, h, w).reshape(b, heads, n, n), terms
        terms = self._rel_terms(q, extent)
        # The first term depends on the key's column only, so it rides in the q.k product:
        # w more dimensions, the term's values against a one-hot of the key column. XLA:CPU
        # then adds one broadcast term less over the n x n logits (encoder forward ~4 %
        # faster); the same sums to float32 rounding.
        column = jnp.broadcast_to(jnp.eye(w, dtype=F32), (b, heads, d, h, w, w))
        qa = jnp.concatenate([qs, terms.a[..., :w]], axis=-1).reshape(b, heads, n, e + w)
        ka = jnp.concatenate([k.astype(F32), column], axis=-1).reshape(b, heads, n, e + w)
        logits = jnp.einsum("bkxe,bkye->bkxy", qa, ka, preferred_element_type=F32)
        logits = logits.reshape(b, heads, d, h, w, n) + terms.row_bias(d, h, w).reshape(
            b, heads, d, h, 1, n
        )
        return logits.reshape(b, heads, n, n), terms

    def attend(self, x: Array, window: int | None = None) -> Array:
        """Attention over the real tokens of one (possibly partly padded) window.

        x: (B, d, h, w, C) real tokens. `window` is the padded window side the original
        would use (None for global attention, where the grid itself is the window).
        Returns (B, d, h, w, C) after the output projection.
        """
        b, d, h, w, c = x.shape
        q, k, v = self._qkv(x)
        if self.attention_impl == "pallas":
            out = self._attend_pallas(q, k, v, window).transpose(0, 2, 3, 4, 1, 5)
            return self.proj(out.reshape(b, d, h, w, c).astype(self.dtype))
        if resolve_attention_impl(self.attention_impl, self.dtype) != "einsum":
            out = self._attend_fused(q, k, v, window)
            return self.proj(out.reshape(b, d, h, w, c))
        n = d * h * w
        logits, terms = self._logits(q, k, window if window is not None else w)
        values = v.reshape(b, self.num_heads, n, -1).astype(self.dtype)
        # Softmax with the normalisation applied after the PV product (one pass less over
        # the n x n weights); the padded keys of a window enter as one extra logit.
        m = jnp.max(logits, axis=-1, keepdims=True)
        pad_logit = None
        if window is not None and (d, h, w) != (window,) * 3:
            pad_logit = self._padding_logit(q, (d, h, w), window, terms)[..., None]
            m = jnp.maximum(m, pad_logit)
        m = jax.lax.stop_gradient(m)
        e = jnp.exp(logits - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        out = jnp.einsum(
            "bkxy,bkye->bkxe", e.astype(self.dtype), values, preferred_element_type=F32
        )
        if pad_logit is not None:
            e_pad = jnp.exp(pad_logit - m)
            denom = denom + e_pad
            out = out + e_pad * self._bias_parts()[2][None, :, None, :]
        out = (out / denom).astype(self.dtype)
        out = out.reshape(b, self.num_heads, d, h, w, -1).transpose(0, 2, 3, 4, 1, 5)
        return self.proj(out.reshape(b, d, h, w, c))

    def _attend_fused(self, q: Array, k: Array, v: Array, window: int | None) -> Array:
        """`jax.nn.dot_product_attention` (cuDNN's fused kernel, or XLA) with the
        relative-position bias; the padded keys of a window enter as a few extra keys.

        q, k, v: (B, K, d, h, w, E). Returns (B, d * h * w, K, E) in the compute dtype.
        The padded keys' summed weight e^p is carried by a few keys of value b_v and zero
        key vector whose bias logits split p (see `_split_logit`), so a bfloat16 bias keeps
        that weight far more accurate than one rounded logit would.
        """
        impl = resolve_attention_impl(self.attention_impl, self.dtype)
        if impl == "cudnn" and not cudnn_attention_available():
            raise ValueError(
                f"attention_impl 'cudnn' needs an NVIDIA GPU of compute capability >= 8.0 "
                f"(JAX backend is {jax.default_backend()!r}); use 'auto', 'xla' or 'einsum'"
            )
        qs, ks, vs, bias = self.fused_operands(q, k, v, window, impl)
        out = jax.nn.dot_product_attention(
            qs,
            ks,
            vs,
            bias=bias,
            scale=self.scale,
            implementation=impl,
        )
        return out[:, : q.shape[2] * q.shape[3] * q.shape[4]].astype(self.dtype)

    def _attend_pallas(self, q: Array, k: Array, v: Array, window: int | None) -> Array:
        """`rel_pos_attention`: the bias formed from the per-query term rows in the kernel.

        q, k, v: (B, K, d, h, w, E). Returns (B, K, d, h, w, E) in the compute dtype.
        """
        b, heads, d, h, w, e = q.shape
        n = d * h * w

        def rows(t: Array) -> Array:  # (B, K, d, h, w, ...) -> (B * K, n, ...)
            return t.reshape(b * heads, n, -1)

        if self.use_rel_pos:
            terms = self._rel_terms(q, window if window is not None else w)
            # Per query (qd, qh, qw): a + b over (key row d, key column), c over (key row h,
            # key column); c does not depend on qw.
            # Summed in float32, rounded once to the kernel's dtype.
            ab = terms.a[:, :, :, :, :, None, :w] + terms.b[:, :, :, :, None, :d, :w]
            c_rows = terms.c[:, :, :, :, None, :h, :w].astype(self.dtype)
            rel = (ab.astype(self.dtype), jnp.broadcast_to(c_rows, (b, heads, d, h, w, h, w)))
        else:
            terms = None
            rel = (jnp.zeros((b, heads, d, h, w, 1), F32),) * 2
        pad_logit = pad_value = None
        if window is not None and (d, h, w) != (window,) * 3:
            pad_logit = self._padding_logit(q, (d, h, w), window, terms).reshape(b * heads, n)
            b_v = self._bias_parts()[2]  # (K, E)
            pad_value = jnp.broadcast_to(b_v[None], (b, heads, e)).reshape(b * heads, e)
        out = rel_pos_attention(
            rows(q.astype(self.dtype)),
            rows(k.astype(self.dtype)),
            rows(v.astype(self.dtype)),
            tuple(rows(t) for t in rel),
            pad_logit,
            pad_value,
            scale=self.scale,
            box=(d, h, w),
        )
        return out.reshape(b, heads, d, h, w, e)

    def fused_operands(
        self, q: Array, k: Array, v: Array, window: int | None, impl: str
    ) -> tuple[Array, Array, Array, Array | None]:
        """Queries, keys, values (B, n', K, E) and bias (B, K, n', m) for the fused kernel.

        For cuDNN both lengths are even (its backward pass with a bias needs that); the
        extra keys of a partly padded window are chosen so that vit_b_ori needs no padding.
        """
        b, heads, d, h, w, e = q.shape
        n = d * h * w
        dt = self.dtype

        def tokens(t: Array) -> Array:  # (B, K, d, h, w, E) -> (B, n, K, E)
            return t.reshape(b, heads, n, e).transpose(0, 2, 1, 3).astype(dt)

        qs, ks, vs = tokens(q), tokens(k), tokens(v)
        bias = terms = None
        if self.use_rel_pos:
            terms = self._rel_terms(q, window if window is not None else w)
            bias = terms.bias(d, h, w).reshape(b, heads, n, n)
        if window is not None and (d, h, w) != (window,) * 3:
            p = self._padding_logit(q, (d, h, w), window, terms)
            parts = _split_logit(p, dt, parts=padding_key_count(n))
            if bias is None:
                bias = jnp.zeros((b, heads, n, n), F32)
            bias = jnp.concatenate([bias] + [t[..., None] for t in parts], axis=-1)
            ks = jnp.concatenate([ks, jnp.zeros((b, len(parts), heads, e), dt)], axis=1)
            b_v = self._bias_parts()[2].astype(dt)
            vs = jnp.concatenate([vs, jnp.broadcast_to(b_v, (b, len(parts), heads, e))], axis=1)
        if impl == "cudnn" and (n % 2 or ks.shape[1] % 2):
            # cuDNN's backward pass with a bias needs even sequence lengths: pad with
            # zero queries (cropped below) and filler keys of zero weight.
            q_len, kv_len = n + n % 2, ks.shape[1] + ks.shape[1] % 2
            if bias is None:
                bias = jnp.zeros((b, heads, n, ks.shape[1]), F32)
            qs = _pad_axis(qs, 1, q_len)
            ks, vs = _pad_axis(ks, 1, kv_len), _pad_axis(vs, 1, kv_len)
            bias = _pad_axis(_pad_axis(bias, 2, q_len), 3, kv_len, value=_EXCLUDED)
        if bias is not None:
            bias = bias.astype(dt)
        return qs, ks, vs, bias

    def _padding_logit(
        self, q: Array, real: tuple[int, int, int], window: int, terms: RelPosTerms | None
    ) -> Array:
        """Log of the summed softmax weight (before normalisation) of a window's padded keys.

        q: (B, K, nd, nh, nw, E). Returns (B, K, nd * nh * nw).
        """
        b = q.shape[0]
        nd, nh, nw = real
        b_k = self._bias_parts()[1]
        base = jnp.einsum("bkdhwe,ke->bkdhw", q.astype(F32) * self.scale, b_k)
        if terms is None:
            log_pad = jnp.full(base.shape, np.log(window**3 - nd * nh * nw), F32)
        else:
            # The padded keys are the window minus the real box, split into three disjoint
            # sets so that every sum has positive terms only (no cancellation):
            #   c >= nw;   c < nw and a >= nd;   c < nw, a < nd and b >= nh.
            # Each is a sum over the key column c of e^(A_c + log SB_c + log SC_c); one
            # log-sum-exp takes the three sets' columns side by side. The per-column sums over
            # a (SB) and over b (SC) are split at the real box once and recombined.
            lse = logsumexp_short
            x_ext = terms.b.shape[4]
            a = terms.a  # (B, K, nd, nh, nw, X)

            def split_lse(t: Array, real: int) -> tuple[Array, Array | None]:
                """Log-sums over axis 4 of t's real rows and of its padded rows (None if none)."""
                pad = lse(t[:, :, :, :, real:], axis=4) if real < x_ext else None
                return lse(t[:, :, :, :, :real], axis=4), pad

            sb_real, sb_pad = split_lse(terms.b, nd)  # (B, K, nd, nh, X)
            sc_real, sc_pad = split_lse(terms.c, nh)
            sb_all = sb_real if sb_pad is None else jnp.logaddexp(sb_real, sb_pad)
            sc_all = sc_real if sc_pad is None else jnp.logaddexp(sc_real, sc_pad)
            cols = []
            if nw < x_ext:
                cols.append(a[..., nw:] + (sb_all + sc_all)[:, :, :, :, None, nw:])
            if sb_pad is not None:
                cols.append(a[..., :nw] + (sb_pad + sc_all)[:, :, :, :, None, :nw])
            if sc_pad is not None:
                cols.append(a[..., :nw] + (sb_real + sc_pad)[:, :, :, :, None, :nw])
            log_pad = lse(jnp.concatenate(cols, axis=-1), axis=-1)
        return (base + log_pad).reshape(b, self.num_heads, -1)

    def attend_padded(self, x: Array) -> Array:
        """The original's literal attention over a full window, padded tokens included.

        x: (B', ws, ws, ws, C) window tokens (zeros at padded positions).
        """
        b, d, h, w, c = x.shape
        q, k, v = self._qkv(x)
        n = d * h * w
        logits, _ = self._logits(q, k, w)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum(
            "bkxy,bkye->bkxe", probs.astype(self.dtype), v.reshape(b, self.num_heads, n, -1)
        )
        out = out.reshape(b, self.num_heads, d, h, w, -1).transpose(0, 2, 3, 4, 1, 5)
        return self.proj(out.reshape(b, d, h, w, c))


def unrolled_logsumexp() -> bool:
    """Whether short log-sum-exps run as elementwise code over their slices: on GPUs that
    fuses into a neighbouring kernel instead of launching a max and a sum reduction (the
    padded keys' closed form: 8 kernels per windowed block -> 3 at batch 1); XLA:CPU runs
    the reductions faster, and TPUs keep them (not measured there)."""
    return jax.default_backend() == "gpu"


def logsumexp_short(x: Array, axis: int) -> Array:
    """`jax.nn.logsumexp` over a short axis (a window side), unrolled where that fuses better."""
    if not unrolled_logsumexp():
        return jax.nn.logsumexp(x, axis=axis)
    parts = [jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]
    m = jax.lax.stop_gradient(functools.reduce(jnp.maximum, parts))
    return m + jnp.log(functools.reduce(jnp.add, [jnp.exp(t - m) for t in parts]))


def cudnn_attention_available() -> bool:
    """Whether cuDNN's fused attention with a bias can run on JAX's default device."""
    if jax.default_backend() != "gpu":
        return False
    dev = jax.devices()[0]
    try:
        return dev.device_kind.startswith("NVIDIA") and float(dev.compute_capability) >= 8.0
    except (AttributeError, TypeError, ValueError):
        return False


def resolve_attention_impl(impl: str, dtype: jnp.dtype) -> str:
    """The kernel that `attention_impl` stands for here ("auto" picks by device and dtype)."""
    if impl != "auto":
        return impl
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and cudnn_attention_available() else "einsum"


_NEGLIGIBLE = -60.0  # log of a weight fraction too small to matter (e^-60 ~ 1e-26)
_EXCLUDED = -1.0e4  # bias of filler keys: zero weight next to any real logit


def padding_key_count(real_keys: int) -> int:
    """How many keys carry a partly padded window's padded weight in the fused path: 3 or 4,
    whichever makes the key count even. cuDNN's backward pass needs even lengths; padding the
    keys afterwards would copy the whole (B, K, n, n + extra) bias once more per block (10 %
    of the encoder's time at batch 32 on an H200). Eight keys (a key count that is a multiple
    of 8) made that bias's assembly slower, not faster (BENCHMARKS.md)."""
    return 3 + (real_keys + 3) % 2


def _split_logit(p: Array, dtype: jnp.dtype, parts: int = 3) -> list[Array]:
    """Logits representable in `dtype` whose weights add up to e^p far more exactly than
    one rounded logit's would.

    Each part is the remaining weight's logit rounded down to `dtype`; the last carries the
    rest, so the error is the last part's rounding of a small fraction of the weight.
    p: float32. Every part carries p's tangent: shifting all of them by dp shifts the summed
    weight by e^p dp, as for p itself.
    """
    p_c = jax.lax.stop_gradient(p)
    out, remaining = [], p_c
    for i in range(parts):
        part = remaining.astype(dtype)
        if i < parts - 1:
            too_high = part.astype(F32) > remaining
            part = jnp.where(too_high, jnp.nextafter(part, jnp.asarray(-jnp.inf, dtype)), part)
        part = part.astype(F32)
        out.append(part)
        # log(e^remaining - e^part), floored where nothing is left
        rest = jnp.expm1(remaining - part)
        remaining = part + jnp.log(jnp.maximum(rest, np.exp(_NEGLIGIBLE)))
    tangent = p - p_c  # zero, with p's derivative
    return [part + tangent for part in out]


def _pad_axis(x: Array, axis: int, size: int, value: float = 0.0) -> Array:
    """x padded at the high end of `axis` to `size` with `value`."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def window_partition(x: Array, ws: int) -> tuple[Array, tuple[int, int, int]]:
    """Zero-pad (B, D, H, W, C) at the high end to multiples of ws and cut into windows.

    Windows are ordered batch-major, then row-major over the window grid; returns
    (B * nD * nH * nW, ws, ws, ws, C) and the padded sizes.
    """
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % ws, (-h) % ws, (-w) % ws
    x = jnp.pad(x, ((0, 0), (0, pd), (0, ph), (0, pw), (0, 0)))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.reshape(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return x, (dp, hp, wp)


def window_unpartition(x: Array, ws: int, padded: tuple[int, int, int], size: tuple[int, int, int]):
    """Inverse of `window_partition`, cropping the padding away."""
    dp, hp, wp = padded
    c = x.shape[-1]
    x = x.reshape(-1, dp // ws, hp // ws, wp // ws, ws, ws, ws, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, dp, hp, wp, c)
    return x[:, : size[0], : size[1], : size[2]]


def windowed_attention_exact(attn: Attention, x: Array, ws: int) -> Array:
    """Window attention over real tokens plus the closed-form padding term.

    Windows are grouped by how many real tokens they hold along each axis (full windows, and
    the partial last window of an axis), so every group has static shapes.
    """
    b, d, h, w, c = x.shape
    out = jnp.zeros_like(x, dtype=F32)
    per_axis = []
    for n in (d, h, w):
        full, rem = divmod(n, ws)
        groups = []
        if full:
            groups.append((0, full, ws))  # (first window, count, real tokens per window)
        if rem:
            groups.append((full, 1, rem))
        per_axis.append(groups)
    for gd, gh, gw in itertools.product(*per_axis):
        sl = x[
            :,
            gd[0] * ws : gd[0] * ws + gd[1] * gd[2],
            gh[0] * ws : gh[0] * ws + gh[1] * gh[2],
            gw[0] * ws : gw[0] * ws + gw[1] * gw[2],
        ]
        nd, nh, nw = gd[1], gh[1], gw[1]
        rd, rh, rw = gd[2], gh[2], gw[2]
        win = sl.reshape(b, nd, rd, nh, rh, nw, rw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        win = win.reshape(b * nd * nh * nw, rd, rh, rw, c)
        y = attn.attend(win, window=ws).astype(F32)
        y = y.reshape(b, nd, nh, nw, rd, rh, rw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        y = y.reshape(b, nd * rd, nh * rh, nw * rw, c)
        out = out.at[
            :,
            gd[0] * ws : gd[0] * ws + nd * rd,
            gh[0] * ws : gh[0] * ws + nh * rh,
            gw[0] * ws : gw[0] * ws + nw * rw,
        ].set(y)
    return out


class Block3D(nnx.Module):
    """Pre-norm transformer block; windowed or global attention."""

    def __init__(self, cfg: Sam3DConfig, windowed: bool, *, rngs: nnx.Rngs):
        dim = cfg.encoder_embed_dim
        self.norm1 = LayerNorm(dim, epsilon=cfg.encoder_norm_eps, rngs=rngs)
        self.window_size = cfg.window_size if windowed else 0
        self.attn = Attention(cfg, cfg.window_size if windowed else cfg.grid_size, rngs=rngs)
        self.norm2 = LayerNorm(dim, epsilon=cfg.encoder_norm_eps, rngs=rngs)
        self.mlp = MLPBlock(
            dim,
            int(dim * cfg.mlp_ratio),
            act="gelu" if cfg.gelu_form == "exact" else "gelu_tanh",
            dtype=cfg.compute_dtype,
            rngs=rngs,
        )
        self.window_attention = cfg.window_attention

    def __call__(self, x: Array) -> Array:
        """x: (B, D, H, W, C) float32 residual stream."""
        x = materialize_cotangent(x)
        h = self.norm1(x)
        ws = self.window_size
        if ws == 0:
            h = self.attn.attend(h)
        elif self.window_attention == "padded":
            size = h.shape[1:4]
            wins, padded = window_partition(h, ws)
            h = window_unpartition(self.attn.attend_padded(wins), ws, padded, size)
        else:
            h = windowed_attention_exact(self.attn, h, ws)
        x = x + h.astype(F32)
        return x + self.mlp(self.norm2(x)).astype(F32)


class ImageEncoderViT3D(nnx.Module):
    """Patch embedding, absolute positions, ViT blocks and the conv neck."""

    def __init__(self, cfg: Sam3DConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        g = cfg.grid_size
        self.patch_embed = PatchEmbed3D(cfg, rngs=rngs)
        if cfg.use_abs_pos:
            self.pos_embed = nnx.Param(
                jnp.zeros((1, g, g, g, cfg.encoder_embed_dim), F32),
                logical_axes=(None, None, None, None, "embed"),
            )
        self.blocks = nnx.List(
            [Block3D(cfg, cfg.is_windowed(i), rngs=rngs) for i in range(cfg.encoder_depth)]
        )
        out, dtype = cfg.prompt_embed_dim, cfg.compute_dtype
        self.neck = nnx.List(
            [
                conv3d(cfg.encoder_embed_dim, out, 1, use_bias=False, dtype=dtype, rngs=rngs),
                LayerNorm(out, epsilon=1e-6, rngs=rngs),
                conv3d(out, out, 3, padding=1, use_bias=False, dtype=dtype, rngs=rngs),
                LayerNorm(out, epsilon=1e-6, rngs=rngs),
            ]
        )

    def embed_patches(self, x: Array) -> Array:
        """x: (B, D, H, W, C_in) -> tokens (B, g, g, g, C) with absolute positions added."""
        x = self.patch_embed(x).astype(F32)
        if self.cfg.use_abs_pos:
            x = x + self.pos_embed[...]
        return shard(x, TOKEN_AXES)

    def neck_forward(self, x: Array) -> Array:
        for i, layer in enumerate(self.neck):
            x = layer(x.astype(self.cfg.compute_dtype) if i % 2 == 0 else x)
        return x.astype(F32)

    def __call__(self, x: Array) -> Array:
        """x: (B, S, S, S, C_in) volume -> image embedding (B, g, g, g, prompt_embed_dim)."""
        x = self.embed_patches(x)
        for block in self.blocks:
            x = shard(_maybe_remat(block, self.cfg.remat)(x), TOKEN_AXES)
        return shard(self.neck_forward(x), TOKEN_AXES)


def _maybe_remat(block: Block3D, remat: bool):
    """The block itself, or a version whose activations are recomputed in the backward pass."""
    if not remat:
        return block

    @nnx.remat
    def run(blk: Block3D, x: Array) -> Array:
        return blk(x)

    return lambda x: run(block, x)


__all__ = ["Attention", "Block3D", "ImageEncoderViT3D", "PatchEmbed3D", "gelu"]
