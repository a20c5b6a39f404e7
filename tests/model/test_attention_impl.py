"""The fused attention path (`jax.nn.dot_product_attention` with the relative-position bias)
computes the same encoder as the explicit einsum path, whose float32 logits carry the first
relative-position term inside the q.k product (checked against the assembled bias).

In float32 the two agree to rounding, forward and backward, on grids with one padded window,
several partial windows, no padding, and without relative positions or qkv bias. In bfloat16
the fused path is as close to the float32 reference as the einsum path is. The padded keys'
summed weight travels as three or four bias logits (`_split_logit`); its accuracy is checked directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sammed3d_jax import Sam3DConfig
from sammed3d_jax.model.image_encoder import (
    ImageEncoderViT3D,
    _split_logit,
    cudnn_attention_available,
    padding_key_count,
    resolve_attention_impl,
)
from tests.conftest import randomize_params

CASES = {
    # name: (img_size, window size, extra config); patch 8, so the grid side is img / 8
    "one_padded_window": (32, 6, {}),  # 4³ grid in one 6³ window, like vit_b_ori's 8³ in 14³
    "partial_windows": (40, 3, {}),  # windows of 3 + 2 real tokens per axis
    "odd_tokens": (24, 2, {}),  # 3³ grid: odd token counts in windows and globally
    "no_padding": (32, 2, {}),
    "no_rel_pos": (40, 3, {"use_rel_pos": False}),
    "no_qkv_bias": (40, 3, {"qkv_bias": False}),
}


def small_cfg(img: int, window: int, **extra) -> Sam3DConfig:
    return Sam3DConfig(
        img_size=img,
        patch_size=8,
        encoder_embed_dim=48,
        encoder_depth=2,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(1,),
        window_size=window,
        prompt_embed_dim=48,
        **extra,
    )


def random_encoder(cfg: Sam3DConfig, seed: int = 0) -> ImageEncoderViT3D:
    return randomize_params(ImageEncoderViT3D(cfg, rngs=nnx.Rngs(0)), seed)


def with_numerics(enc: ImageEncoderViT3D, **numerics) -> ImageEncoderViT3D:
    other = ImageEncoderViT3D(enc.cfg.replace(**numerics), rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(enc))
    return other


@nnx.jit
def encode(enc: ImageEncoderViT3D, x: jax.Array) -> jax.Array:
    return enc(x)


def volume(cfg: Sam3DConfig, batch: int = 2) -> jax.Array:
    s = cfg.img_size
    return jnp.asarray(np.random.default_rng(7).standard_normal((batch, s, s, s, 1)), jnp.float32)


def rel(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# The three padding shapes run by default; the variants without rel-pos / qkv bias / padding
# run with the slow tests.
FLOAT32_CASES = [
    c
    if c in ("one_padded_window", "partial_windows", "odd_tokens")
    else pytest.param(c, marks=pytest.mark.slow)
    for c in sorted(CASES)
]


@pytest.mark.parametrize("case", FLOAT32_CASES)
def test_fused_equals_einsum_float32(case):
    assert float32_error_vs_einsum(case, "xla") < 1e-5


def float32_error_vs_einsum(case: str, attention_impl: str) -> float:
    """Relative error of a float32 encoder under `attention_impl` against the einsum path."""
    img, window, extra = CASES[case]
    enc = random_encoder(small_cfg(img, window, **extra))
    x = volume(enc.cfg)
    with jax.default_matmul_precision("highest"):
        ref = encode(enc, x)
        out = encode(with_numerics(enc, attention_impl=attention_impl), x)
    return rel(out, ref)


@pytest.mark.parametrize(
    "case", ["one_padded_window", pytest.param("partial_windows", marks=pytest.mark.slow)]
)
def test_fused_gradients_equal_einsum(case):
    assert_gradients_equal_einsum(case, "xla")


def assert_gradients_equal_einsum(case: str, attention_impl: str) -> None:
    """Weight gradients of a float32 encoder under `attention_impl` equal the einsum path's."""
    img, window, extra = CASES[case]
    enc = random_encoder(small_cfg(img, window, **extra), seed=3)
    x = volume(enc.cfg, batch=1)

    def grads(model):
        def loss(m):
            return jnp.mean(jnp.square(m(x)))

        return nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(model))

    with jax.default_matmul_precision("highest"):
        ref = grads(enc)
        out = grads(with_numerics(enc, attention_impl=attention_impl))
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    for path, g in jax.tree_util.tree_leaves_with_path(out):
        r = flat_ref[path]
        scale = float(jnp.max(jnp.abs(r))) or 1.0
        assert float(jnp.max(jnp.abs(g - r))) / scale < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.parametrize("case", ["one_padded_window", "partial_windows"])
def test_fused_bfloat16_as_accurate_as_einsum(case):
    img, window, extra = CASES[case]
    enc = random_encoder(small_cfg(img, window, **extra), seed=5)
    x = volume(enc.cfg)
    with jax.default_matmul_precision("highest"):
        ref = encode(enc, x)
    err_einsum = rel(encode(with_numerics(enc, dtype="bfloat16", attention_impl="einsum"), x), ref)
    err_fused = rel(encode(with_numerics(enc, dtype="bfloat16", attention_impl="xla"), x), ref)
    assert err_einsum < 0.02
    assert err_fused < 1.5 * err_einsum + 1e-3


def test_padding_keys_make_even_key_counts():
    # vit_b_ori: 512 real keys + 4 -> 516, so cuDNN needs no padded copy of the bias.
    assert padding_key_count(512) == 4
    for n in range(1, 100):
        assert padding_key_count(n) in (3, 4)
        assert (n + padding_key_count(n)) % 2 == 0


@pytest.mark.parametrize("window, grid", [(14, 8), (6, 4), (6, 3)])
def test_cudnn_operands_have_even_lengths_without_padding_vit_b_windows(window, grid):
    """What cuDNN receives (traced on any backend): even query and key counts, and for an
    even real-token count (vit_b_ori: 8³ in a 14³ window) no padded copy of the bias."""
    from sammed3d_jax.model.image_encoder import Attention

    cfg = Sam3DConfig.from_variant("vit_b_ori", dtype="bfloat16", attention_impl="cudnn")
    attn = nnx.eval_shape(lambda: Attention(cfg, window, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(attn)
    shape = (2, cfg.encoder_num_heads, grid, grid, grid, 64)
    q = k = v = jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    def operands(state, q, k, v):
        return nnx.merge(graphdef, state).fused_operands(q, k, v, window, "cudnn")

    qs, ks, vs, bias = jax.eval_shape(operands, state, q, k, v)
    assert vs.shape == ks.shape
    n = grid**3
    assert qs.shape[1] % 2 == 0 and ks.shape[1] % 2 == 0
    assert bias.shape == (2, cfg.encoder_num_heads, qs.shape[1], ks.shape[1])
    prims = {e.primitive.name for e in jax.make_jaxpr(operands)(state, q, k, v).eqns}
    if n % 2 == 0:
        assert (qs.shape[1], ks.shape[1]) == (n, n + padding_key_count(n))
        assert "pad" not in prims
    else:
        assert qs.shape[1] == n + 1


@pytest.mark.parametrize("n_parts", [3, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_split_logit_keeps_the_padding_weight(dtype, n_parts):
    # Logits of the size the padded keys reach (log of ~2,000 keys plus bias terms).
    p = jnp.asarray(np.random.default_rng(0).uniform(-12.0, 12.0, 10_000), jnp.float32)
    parts = _split_logit(p, jnp.dtype(dtype), parts=n_parts)
    assert len(parts) == n_parts
    weight = jnp.zeros_like(p)  # summed weight of the parts, relative to e^p
    for part in parts:
        rounded = part.astype(dtype).astype(jnp.float32)
        assert bool(jnp.all(rounded == part))
        weight = weight + jnp.exp(rounded - p)
    err = float(jnp.max(jnp.abs(weight - 1.0)))
    assert err < 3e-4  # vs ~3 % for one rounded bfloat16 logit of this size
    one = jnp.exp(p.astype(dtype).astype(jnp.float32) - p)  # a single rounded logit
    assert float(jnp.max(jnp.abs(one - 1.0))) > 50 * err
    # The parts move with p: d(sum of weights)/dp = e^p.
    grad = jax.grad(
        lambda x: sum(jnp.exp(t) for t in _split_logit(x, jnp.dtype(dtype), parts=n_parts))
    )
    x = jnp.float32(3.3)
    assert abs(float(grad(x)) / float(jnp.exp(x)) - 1.0) < 1e-3


def test_gelu_form_resolution():
    assert Sam3DConfig().gelu_form == "exact"  # float32: the original's exact GELU
    assert Sam3DConfig(dtype="bfloat16").gelu_form == "tanh"
    assert Sam3DConfig(dtype="bfloat16", gelu="exact").gelu_form == "exact"
    assert Sam3DConfig(gelu="tanh").gelu_form == "tanh"
    with pytest.raises(ValueError, match="gelu 'fast'"):
        Sam3DConfig(gelu="fast")


def test_attention_impl_validation():
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        Sam3DConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="'cudnn' needs dtype bfloat16"):
        Sam3DConfig(attention_impl="cudnn")


def test_auto_resolution():
    on_gpu = cudnn_attention_available()
    assert resolve_attention_impl("auto", jnp.float32) == "einsum"
    assert resolve_attention_impl("auto", jnp.bfloat16) == ("cudnn" if on_gpu else "einsum")
    assert resolve_attention_impl("xla", jnp.float32) == "xla"
    assert Sam3DConfig().attention_impl == "auto"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off-GPU")
def test_cudnn_off_gpu_is_a_clear_error():
    enc = random_encoder(small_cfg(32, 6, dtype="bfloat16", attention_impl="cudnn"))
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        enc(volume(enc.cfg, batch=1))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize("case", ["one_padded_window", "partial_windows", "odd_tokens"])
def test_cudnn_as_accurate_as_einsum(case):
    """Forward and backward through cuDNN (bias gradient included) in bfloat16."""
    img, window, extra = CASES[case]
    enc = random_encoder(small_cfg(img, window, **extra), seed=11)
    x = volume(enc.cfg)

    def grads(model):
        return nnx.to_pure_dict(nnx.jit(nnx.grad(lambda m: jnp.mean(jnp.square(m(x)))))(model))

    with jax.default_matmul_precision("highest"):
        ref, ref_g = encode(enc, x), grads(enc)
    einsum = with_numerics(enc, dtype="bfloat16", attention_impl="einsum")
    cudnn = with_numerics(enc, dtype="bfloat16", attention_impl="cudnn")
    assert rel(encode(cudnn, x), ref) < 1.5 * rel(encode(einsum, x), ref) + 1e-3
    g_einsum, g_cudnn = grads(einsum), grads(cudnn)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_g))
    flat_einsum = dict(jax.tree_util.tree_leaves_with_path(g_einsum))
    for path, g in jax.tree_util.tree_leaves_with_path(g_cudnn):
        r = flat_ref[path]
        scale = float(jnp.max(jnp.abs(r))) or 1.0
        err = float(jnp.max(jnp.abs(g - r))) / scale
        err_einsum = float(jnp.max(jnp.abs(flat_einsum[path] - r))) / scale
        assert err < 2 * err_einsum + 2e-2, jax.tree_util.keystr(path)


@pytest.mark.parametrize("real, extent", [((4, 4, 4), 4), ((4, 3, 2), 6), ((2, 2, 2), 3)])
def test_float32_logits_carry_the_column_term_in_the_product(real, extent):
    """The float32 logits fold the first relative-position term into q.k (one-hot key
    columns): values and gradients equal q.k plus the assembled bias."""
    enc = random_encoder(small_cfg(40, extent))
    attn = enc.blocks[0].attn
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.normal(size=(2, 3, *real, 16)), jnp.float32) for _ in range(2))
    n = int(np.prod(real))

    def reference(q, k):
        plain = jnp.einsum(
            "bkxe,bkye->bkxy", (q * attn.scale).reshape(2, 3, n, 16), k.reshape(2, 3, n, 16)
        )
        return plain + attn._rel_terms(q, extent).bias(*real).reshape(2, 3, n, n)

    with jax.default_matmul_precision("highest"):
        folded = attn._logits(q, k, extent)[0]
        np.testing.assert_allclose(folded, reference(q, k), rtol=1e-5, atol=1e-5)
        w = jnp.asarray(rng.normal(size=folded.shape), jnp.float32)
        grads = jax.grad(lambda q, k: jnp.sum(attn._logits(q, k, extent)[0] * w), (0, 1))(q, k)
        want = jax.grad(lambda q, k: jnp.sum(reference(q, k) * w), (0, 1))(q, k)
    for got, ref in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
