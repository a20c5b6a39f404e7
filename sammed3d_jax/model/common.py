"""Building blocks shared by the encoder, prompt encoder and decoder.

PyTorch defaults are reproduced explicitly: exact (erf) GELU, LayerNorm with the two-pass
variance and an explicit epsilon, and PyTorch's default parameter initialisation
(Kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in)) for weights and biases).
Parameters carry a `logical_axes` metadata entry that `sammed3d_jax.sharding` maps to mesh axes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """Exact (erf) GELU, PyTorch's `nn.GELU()` default.

    The backward pass keeps only the input and recomputes ``Phi(x) + x phi(x)`` from it
    (in float32): automatic differentiation would keep the erf and exp terms as well, three
    tensors per activation, which inside the training step's click loop are stacked for
    every pass.
    """
    return _gelu_erf(x)


def _gelu_erf(x: Array) -> Array:
    """``x Phi(x)`` with ``Phi = (1 + erf(x / sqrt 2)) / 2``, PyTorch's formula, in float32.

    `jax.nn.gelu` goes through erfc instead, which XLA:CPU evaluates ~2.5x slower (0.75 vs
    0.30 ms for one encoder MLP's activations); both agree with PyTorch to float32 rounding.
    ``1 + erf`` cancels for negative x, so narrower inputs are computed in float32 and the
    result rounded once.
    """
    xf = x.astype(jnp.float32)
    return (xf * (0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0)))))).astype(x.dtype)


def _gelu_fwd(x: Array) -> tuple[Array, Array]:
    return _gelu_erf(x), x


def _gelu_bwd(x: Array, g: Array) -> tuple[Array]:
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)

_TANH_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_tanh(x: Array) -> Array:
    """GELU's tanh approximation (`nn.GELU(approximate="tanh")`); the backward pass, like
    :func:`gelu`'s, keeps only the input."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x: Array) -> tuple[Array, Array]:
    return jax.nn.gelu(x, approximate=True), x


def _gelu_tanh_bwd(x: Array, g: Array) -> tuple[Array]:
    xf = x.astype(jnp.float32)
    # With s = sigmoid(2u) = (1 + tanh u) / 2, 1 - tanh² u = 4 s (1 - s): no cancellation in
    # the tails, where tanh rounds to ±1.
    s = jax.nn.sigmoid(2.0 * _TANH_C * (xf + 0.044715 * xf**3))
    slope = s + 2.0 * xf * s * (1.0 - s) * _TANH_C * (1.0 + 3 * 0.044715 * xf * xf)
    return ((g.astype(jnp.float32) * slope).astype(g.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)
ACTIVATIONS = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": jax.nn.relu}


@jax.custom_vjp
def materialize_cotangent(x: Array) -> Array:
    """Identity whose backward pass, on CPU, writes the incoming gradient out to memory.

    Placed on the encoder's residual stream between blocks. XLA:CPU otherwise never
    materialises the residual gradient: every fusion that reads it recomputes the whole
    chain of gradient additions from the last block down (fusions of 170 operands, most of
    the encoder's backward time spent in LayerNorm gradients). A conditional is a fusion
    boundary; its predicate is data-dependent so that it is not folded away. Other
    backends fuse with a cost model and get the identity.
    """
    return x


def _materialize_fwd(x: Array) -> tuple[Array, None]:
    return x, None


def _materialize_on_cpu(g: Array) -> Array:
    first = g[(0,) * g.ndim]  # one element (a reshape would regather a sharded g)
    # Both branches give g exactly (x * 1 == x for every float, NaN included).
    return jax.lax.cond(first == first, lambda t: t, lambda t: t * 1, g)


def _materialize_bwd(_, g: Array) -> tuple[Array]:
    return (jax.lax.platform_dependent(g, cpu=_materialize_on_cpu, default=lambda t: t),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


class Buffer(nnx.Variable):
    """A persistent, non-trainable array (PyTorch `register_buffer`): saved, never optimised."""


def torch_kernel_init() -> nnx.Initializer:
    """PyTorch's default Linear/Conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nnx.Initializer:
    bound = 1.0 / np.sqrt(max(fan_in, 1))

    def init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
    use_bias: bool = True,
) -> nnx.Linear:
    """A PyTorch-initialised `nnx.Linear` with float32 params and logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_kernel_init(),
        bias_init=torch_bias_init(in_features),
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": (axes[1],)},
        rngs=rngs,
    )


def patch_conv(x: Array, kernel: Array, bias: Array | None, dtype: jnp.dtype) -> Array:
    """Conv3d with kernel = stride and no padding (non-overlapping patches) as one matmul.

    x: (B, D, H, W, C_in); kernel: (p, p, p, C_in, C_out). Each output voxel is the dot
    product of one p³ patch with the kernel: a reshape into patches and a matmul compute
    exactly that, where a strided convolution is slow on CPU for few channels and its
    gradient is slower still.
    """
    p = kernel.shape[0]
    b, d, h, w, c = x.shape
    if p > 1:
        x = x.reshape(b, d // p, p, h // p, p, w // p, p, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b, d // p, h // p, w // p, p * p * p * c)
    y = jnp.einsum("bdhwk,kc->bdhwc", x.astype(dtype), kernel.reshape(p**3 * c, -1).astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


class PatchConv3d(nnx.Conv):
    """`nnx.Conv` (same parameters) for kernel = stride, no padding, via :func:`patch_conv`."""

    def __call__(self, inputs: Array) -> Array:  # type: ignore[override]
        bias = self.bias[...] if self.bias is not None else None
        return patch_conv(inputs, self.kernel[...], bias, self.dtype)


def same_conv(x: Array, kernel: Array, bias: Array | None, dtype: jnp.dtype) -> Array:
    """Stride-1 Conv3d with an odd kernel k and zero padding k // 2 ("same" size) as one
    matmul over the k² (h, w) taps and k shifted sums along d.

    x: (B, D, H, W, C_in); kernel: (k, k, k, C_in, C_out). The k² taps in the (h, w) plane
    are concatenated along channels (k² C_in), one matmul produces the output of each of
    the k d-taps side by side (k C_out), and output d sums d-tap a of input d + a - k // 2.
    On CPU this runs at the matmul rate, about twice as fast as XLA's convolution (the
    encoder neck's 3³ convolution at 384 channels: ~10 against ~19 ms).
    """
    k = kernel.shape[0]
    p = k // 2
    b, d, h, w, c = x.shape
    c_out = kernel.shape[-1]
    xp = jnp.pad(x.astype(dtype), ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))
    taps = jnp.concatenate([xp[:, :, i : i + h, j : j + w] for i in range(k) for j in range(k)], -1)
    # rows (h-tap, w-tap, C_in), columns (d-tap, C_out)
    wk = kernel.astype(dtype).transpose(1, 2, 3, 0, 4).reshape(k * k * c, k * c_out)
    y = jnp.einsum("bdhwk,kn->bdhwn", taps, wk).reshape(b, d, h, w, k, c_out)
    y = jnp.pad(y, ((0, 0), (p, p), (0, 0), (0, 0), (0, 0), (0, 0)))
    out = sum(y[:, a : a + d, :, :, a] for a in range(k))
    return out if bias is None else out + bias.astype(dtype)


class SameConv3d(nnx.Conv):
    """`nnx.Conv` (same parameters) for stride 1, odd kernel, padding k // 2: on CPU via
    :func:`same_conv`; elsewhere XLA's convolution (cuDNN on GPUs)."""

    def __call__(self, inputs: Array) -> Array:  # type: ignore[override]
        if jax.default_backend() != "cpu":
            return super().__call__(inputs)
        bias = self.bias[...] if self.bias is not None else None
        return same_conv(inputs, self.kernel[...], bias, self.dtype)


def conv3d(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A channels-last 3D convolution with PyTorch's initialisation and zero padding.

    Non-overlapping kernels (kernel = stride, no padding) run as :func:`patch_conv`, stride-1
    "same" convolutions (odd kernel, padding kernel // 2) as :class:`SameConv3d`.
    """
    fan_in = in_features * kernel_size**3
    if kernel_size == stride and padding == 0:
        cls = PatchConv3d
    elif stride == 1 and kernel_size % 2 == 1 and padding == kernel_size // 2:
        cls = SameConv3d
    else:
        cls = nnx.Conv
    return cls(
        in_features,
        out_features,
        kernel_size=(kernel_size,) * 3,
        strides=(stride,) * 3,
        padding=((padding, padding),) * 3,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_kernel_init(),
        bias_init=torch_bias_init(fan_in),
        kernel_metadata={"logical_axes": (None, None, None, "conv_in", "conv_out")},
        bias_metadata={"logical_axes": ("conv_out",)},
        rngs=rngs,
    )


class LayerNorm(nnx.LayerNorm):
    """LayerNorm over the last axis, statistics in float32 with the two-pass variance.

    Used channels-last both for `nn.LayerNorm` and for the original's channels-first
    `LayerNorm3d` (same arithmetic over the channel axis).
    """

    def __init__(self, num_features: int, *, epsilon: float, rngs: nnx.Rngs):
        super().__init__(
            num_features,
            epsilon=epsilon,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            use_fast_variance=False,
            scale_metadata={"logical_axes": ("norm",)},
            bias_metadata={"logical_axes": ("norm",)},
            rngs=rngs,
        )

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        return super().__call__(x.astype(jnp.float32), *args, **kwargs)


class Embedding(nnx.Module):
    """A learned table read directly (PyTorch `nn.Embedding(...).weight`), init N(0, 1)."""

    def __init__(self, num: int, features: int, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            jax.random.normal(rngs.params(), (num, features), jnp.float32),
            logical_axes=(None, "embed_prompt"),
        )


class MLPBlock(nnx.Module):
    """lin1 -> activation -> lin2 (the encoder MLP uses GELU, the decoder MLP ReLU).

    act: a key of `ACTIVATIONS`.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        act: str,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        axes: tuple[str, str] = ("embed", "mlp"),
    ):
        self.lin1 = linear(dim, hidden, axes=axes, dtype=dtype, rngs=rngs)
        self.lin2 = linear(hidden, dim, axes=(axes[1], axes[0]), dtype=dtype, rngs=rngs)
        if act not in ACTIVATIONS:
            raise ValueError(f"MLPBlock: unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
        self.act = act

    def __call__(self, x: Array) -> Array:
        return self.lin2(ACTIVATIONS[self.act](self.lin1(x)))


class MLP(nnx.Module):
    """`num_layers` Linear layers with ReLU between them and none after the last."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nnx.List(
            [
                linear(a, b, axes=("embed_prompt", "mlp"), dtype=dtype, rngs=rngs)
                for a, b in itertools.pairwise(dims)
            ]
        )

    def __call__(self, x: Array) -> Array:
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1:
                x = jax.nn.relu(x)
        return x


class ConvTranspose3dK2(nnx.Module):
    """PyTorch `ConvTranspose3d(kernel_size=2, stride=2)` as one matmul and a reshuffle.

    With kernel = stride there is no overlap:
    ``out[b, 2d+a, 2h+b', 2w+g, o] = bias[o] + sum_i x[b, d, h, w, i] * W[i, o, a, b', g]``,
    i.e. a (voxels, in) x (in, 8·out) matmul whose columns are then moved into place. The
    kernel is stored as ``(2, 2, 2, in, out)`` (= PyTorch's ``(in, out, 2, 2, 2)`` moved
    axis-wise, no spatial flip).
    """

    def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # PyTorch computes fan_in of a transposed-conv weight from its dim 1 (= out channels).
        fan_in = out_features * 8
        bound = 1.0 / np.sqrt(fan_in)
        self.kernel = nnx.Param(
            jax.random.uniform(
                rngs.params(), (2, 2, 2, in_features, out_features), jnp.float32, -bound, bound
            ),
            logical_axes=(None, None, None, "conv_in", "conv_out"),
        )
        self.bias = nnx.Param(
            jax.random.uniform(rngs.params(), (out_features,), jnp.float32, -bound, bound),
            logical_axes=("conv_out",),
        )
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        b, d, h, w, c = x.shape
        k = self.kernel[...].astype(self.dtype)
        # One plain matmul with the output's 2x2x2 offsets as extra columns; writing it as a
        # single einsum into the interleaved layout makes the gradients contract over
        # strided axes, 1.5x slower on CPU.
        y = jnp.einsum(
            "ni,ixyzo->nxyzo", x.reshape(-1, c).astype(self.dtype), k.transpose(3, 0, 1, 2, 4)
        )
        y = y.reshape(b, d, h, w, 2, 2, 2, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        y = y.reshape(b, 2 * d, 2 * h, 2 * w, -1)
        return y + self.bias[...].astype(self.dtype)


def _linear_taps(n: int, out_size: int) -> tuple[np.ndarray, ...]:
    """Source indices and weights of PyTorch's `align_corners=False` linear resize of one axis.

    Output index o reads source s = (o + 0.5) * in/out - 0.5 clamped below at 0 and blends
    floor(s) and min(floor(s) + 1, in - 1); positions in float32, as PyTorch computes them for
    float32 inputs.
    """
    f32 = np.float32
    scale = f32(n) / f32(out_size)
    src = np.maximum((np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0.0))
    i0 = np.floor(src).astype(np.int32)
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = np.minimum(np.maximum(src - i0.astype(f32), f32(0.0)), f32(1.0))
    return i0, i1, f32(1.0) - w1, w1


def _index_runs(x: Array, axis: int, idx: np.ndarray) -> Array | None:
    """``take(x, idx, axis)`` as a concatenation of at most 4 slices (None if it needs more)."""
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    if len(breaks) > 3:
        return None
    bounds = [0, *breaks.tolist(), len(idx)]
    pieces = [
        jax.lax.slice_in_dim(x, int(idx[a]), int(idx[b - 1]) + 1, axis=axis)
        for a, b in itertools.pairwise(bounds)
    ]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)


def _blend_axis(x: Array, axis: int, out_size: int) -> Array:
    n = x.shape[axis]
    i0, i1, w0, w1 = _linear_taps(n, out_size)
    if out_size % n == 0:
        # Integer factor f: output o = f * i + r reads a (near-)contiguous run of sources for
        # each phase r, so the gathers become slices and the phases interleave by a reshape.
        f = out_size // n
        shape = [1] * x.ndim
        shape[axis] = n
        phases = []
        for r in range(f):
            a = _index_runs(x, axis, i0[r::f])
            b = _index_runs(x, axis, i1[r::f])
            if a is None or b is None:
                break
            phases.append(
                jnp.asarray(w0[r::f]).reshape(shape) * a + jnp.asarray(w1[r::f]).reshape(shape) * b
            )
        else:
            out_shape = list(x.shape)
            out_shape[axis] = out_size
            return jnp.stack(phases, axis=axis + 1).reshape(out_shape)
    shape = [1] * x.ndim
    shape[axis] = out_size
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return jnp.asarray(w0).reshape(shape) * a + jnp.asarray(w1).reshape(shape) * b


def upsample_linear_axis(x: Array, axis: int, out_size: int) -> Array:
    """Linear resize of one axis like PyTorch `interpolate(..., align_corners=False)`.

    The forward pass blends the two neighbours as ``w0 * a + w1 * b`` (no matmul, so the
    result does not depend on the matmul precision), reading them with slices for integer
    factors and with gathers otherwise. The backward pass is the product with the transposed
    (out, in) interpolation matrix in full float32 precision: the automatic transpose of the
    gathers is a scatter-add with transposed copies, several times slower than the forward
    pass on XLA:CPU.
    """
    axis = axis % x.ndim
    return _resize_axis(x, axis, x.shape[axis], out_size)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _resize_axis(x: Array, axis: int, in_size: int, out_size: int) -> Array:
    return _blend_axis(x, axis, out_size)


def _resize_axis_fwd(x: Array, axis: int, in_size: int, out_size: int) -> tuple[Array, None]:
    return _blend_axis(x, axis, out_size), None


def _resize_axis_bwd(axis: int, in_size: int, out_size: int, _: None, g: Array) -> tuple[Array]:
    i0, i1, w0, w1 = _linear_taps(in_size, out_size)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), w0)
    np.add.at(m, (np.arange(out_size), i1), w1)
    hi = jax.lax.Precision.HIGHEST
    shape = list(g.shape)
    shape[axis] = in_size
    if axis == g.ndim - 1:  # (rest, out) @ (out, in)
        gx = jnp.matmul(g.reshape(-1, out_size), jnp.asarray(m, g.dtype), precision=hi)
        return (gx.reshape(shape),)
    # Batched (in, out) @ (out, rest) over the leading axes: g is read in its own layout, so
    # no transposed copy of the full-size gradient is made.
    lead = int(np.prod(g.shape[:axis]))
    g3 = g.reshape(lead, out_size, -1)
    mt = jnp.broadcast_to(jnp.asarray(m.T, g.dtype), (lead, in_size, out_size))
    gx = jax.lax.dot_general(
        mt, g3, (((2,), (1,)), ((0,), (0,))), precision=hi, preferred_element_type=g.dtype
    )
    return (gx.reshape(shape),)


_resize_axis.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def upsample_logits(logits: Array, size: int | Sequence[int]) -> Array:
    """Trilinear resize of ``(..., D, H, W)`` logits, `align_corners=False`.

    Interpolates the last axis first, then the middle, then the first, which is exactly
    PyTorch's nested CPU arithmetic; returns float32 ``(..., *size)``.
    """
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    x = logits.astype(jnp.float32)
    for axis, out in zip((-1, -2, -3), size[::-1]):
        x = upsample_linear_axis(x, x.ndim + axis, out)
    return x
