"""Module-by-module parity with medim's PyTorch SAM-Med3D (random weights, float32).

The PyTorch reference is built with the same configuration and its random weights are
converted with the project's converter, so every comparison also exercises the key mapping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("medim")

from sammed3d_jax import Sam3DConfig  # noqa: E402
from sammed3d_jax.checkpoint import model_from_state_dict  # noqa: E402
from sammed3d_jax.convert.torch_to_jax import flax_state_to_torch  # noqa: E402
from sammed3d_jax.convert.verify import build_reference  # noqa: E402
from sammed3d_jax.model.common import (  # noqa: E402
    ConvTranspose3dK2,
    gelu,
    gelu_tanh,
    upsample_linear_axis,
    upsample_logits,
)

pytestmark = pytest.mark.torch
TOL = 1e-4


def close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = max(np.abs(ref).max(), 1e-12)
    rel = np.abs(ours - ref).max() / scale
    assert rel <= tol, f"max_rel {rel:.3e} > {tol:g}"


def randomize(module, seed):
    """Give every parameter (zero-initialised tables included) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            scale = 0.1 if "rel_pos" in name or "pos_embed" in name else 0.05
            if name.endswith(".weight") and p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "gaussian_matrix" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def pair(cfg: Sam3DConfig, seed: int = 0, **numerics):
    ref = build_reference(cfg)
    randomize(ref, seed)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    ours, _ = model_from_state_dict(sd, cfg, **numerics)
    return ours, ref


# Jitted (as the model runs in practice): eager dispatch of the encoder's many small ops
# compiles each one separately and is far slower.
run_block = jax.jit(lambda blk, x: blk(x))
run_encode = jax.jit(lambda model, x: model.encode(x))


def nchw(x):
    return np.asarray(x).transpose(0, 4, 1, 2, 3)


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


CONFIGS = {
    "small": Sam3DConfig.from_variant("small"),
    # 96^3 input: a 6^3 grid padded to 8^3 = 2x2x2 windows of side 4 (full and partial windows).
    "multi_window": Sam3DConfig.from_variant(
        "tiny", img_size=96, window_size=4, encoder_global_attn_indexes=(1,), decoder_mlp_dim=2048
    ),
    "no_abs_no_bias_all_global": Sam3DConfig.from_variant(
        "tiny",
        window_size=0,
        encoder_global_attn_indexes=(0, 1),
        use_abs_pos=False,
        qkv_bias=False,
        decoder_mlp_dim=2048,
    ),
    "no_rel_pos": Sam3DConfig.from_variant("tiny", use_rel_pos=False, decoder_mlp_dim=2048),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    cfg = CONFIGS[request.param]
    return (cfg, *pair(cfg, seed=hash(request.param) % 1000))


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_image_encoder_blocks_and_neck(models):
    cfg, ours, ref = models
    x = np.random.default_rng(0).standard_normal((2, 1, *(cfg.img_size,) * 3)).astype(np.float32)
    with torch.no_grad():
        tok = ref.image_encoder.patch_embed(t(x))
        if ref.image_encoder.pos_embed is not None:
            tok = tok + ref.image_encoder.pos_embed
        ref_tokens = [tok]
        for blk in ref.image_encoder.blocks:
            tok = blk(tok)
            ref_tokens.append(tok)
        ref_emb = ref.image_encoder.neck(tok.permute(0, 4, 1, 2, 3))
    enc = ours.image_encoder
    y = enc.embed_patches(jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    close(y, ref_tokens[0].numpy())
    for blk, r_in, r_out in zip(enc.blocks, ref_tokens[:-1], ref_tokens[1:]):
        close(run_block(blk, jnp.asarray(r_in.numpy())), r_out.numpy())
    close(nchw(enc.neck_forward(jnp.asarray(ref_tokens[-1].numpy()))), ref_emb.numpy())
    close(nchw(run_encode(ours, jnp.asarray(x[:, 0]))), ref_emb.numpy())


def test_padded_and_exact_window_modes_agree(models):
    cfg, ours, _ = models
    if not any(cfg.is_windowed(i) for i in range(cfg.encoder_depth)):
        pytest.skip("no windowed block in this configuration")
    padded, _ = model_from_state_dict(
        flax_state_to_torch(nnx.state(ours)), cfg.replace(window_attention="padded")
    )
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, *(cfg.img_size,) * 3), np.float32))
    close(run_encode(ours, x), run_encode(padded, x), tol=2e-5)


def test_prompt_encoder(models):
    cfg, ours, ref = models
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, cfg.img_size - 1, (2, 4, 3)).astype(np.float32)
    labels = np.array([[1, 0, -1, 1], [0, 0, 1, -1]], np.int64)
    mask = rng.standard_normal((2, 1, *(cfg.low_res_size,) * 3)).astype(np.float32)
    with torch.no_grad():
        sp, de = ref.prompt_encoder(points=(t(pts), t(labels)), boxes=None, masks=t(mask))
        sp0, de0 = ref.prompt_encoder(points=None, boxes=None, masks=None)
        pe = ref.prompt_encoder.get_dense_pe()
    s, d, valid = ours.prompt_encoder(
        (jnp.asarray(pts), jnp.asarray(labels)), jnp.asarray(mask[:, 0])
    )
    close(s, sp.numpy())
    close(nchw(d), de.numpy())
    assert bool(valid.all())
    s0, d0, _ = ours.prompt_encoder(None, None)
    assert s0.shape == tuple(sp0.shape)
    close(nchw(d0), de0.detach().numpy())
    close(nchw(ours.prompt_encoder.get_dense_pe()), pe.numpy())


@pytest.mark.parametrize("multimask", [False, True])
def test_mask_decoder_two_prompts_share_one_embedding(models, multimask):
    cfg, ours, ref = models
    rng = np.random.default_rng(3)
    g = cfg.grid_size
    emb = rng.standard_normal((1, cfg.prompt_embed_dim, g, g, g)).astype(np.float32)
    pts = rng.uniform(0, cfg.img_size - 1, (2, 2, 3)).astype(np.float32)
    labels = np.array([[1, 0], [1, 1]], np.int64)
    mask = rng.standard_normal((2, 1, *(cfg.low_res_size,) * 3)).astype(np.float32)
    with torch.no_grad():
        sp, de = ref.prompt_encoder(points=(t(pts), t(labels)), boxes=None, masks=t(mask))
        low, iou = ref.mask_decoder(t(emb), ref.prompt_encoder.get_dense_pe(), sp, de, multimask)
    out = ours.decode(
        jnp.asarray(emb.transpose(0, 2, 3, 4, 1)),
        jnp.asarray(pts),
        jnp.asarray(labels),
        jnp.asarray(mask),
        multimask_output=multimask,
    )
    close(out.low_res_logits, low.numpy())
    close(out.iou_predictions, iou.numpy())


def test_layer_norm_3d_matches():
    from medim.models.sam_med3d import LayerNorm3d

    from sammed3d_jax.model.common import LayerNorm

    ln_t = LayerNorm3d(16)
    randomize(ln_t, 5)
    ln = LayerNorm(16, epsilon=1e-6, rngs=nnx.Rngs(0))
    ln.scale.value = jnp.asarray(ln_t.weight.detach().numpy())
    ln.bias.value = jnp.asarray(ln_t.bias.detach().numpy())
    x = (np.random.default_rng(4).standard_normal((2, 16, 3, 4, 5)) * 3 + 7).astype(np.float32)
    with torch.no_grad():
        ref = ln_t(t(x)).numpy()
    close(nchw(ln(jnp.asarray(x.transpose(0, 2, 3, 4, 1)))), ref)


def test_conv_transpose_matches_pytorch():
    conv = torch.nn.ConvTranspose3d(6, 5, kernel_size=2, stride=2)
    ours = ConvTranspose3dK2(6, 5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    ours.kernel.value = jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 4, 0, 1))
    ours.bias.value = jnp.asarray(conv.bias.detach().numpy())
    x = np.random.default_rng(6).standard_normal((2, 6, 3, 4, 5)).astype(np.float32)
    with torch.no_grad():
        ref = conv(t(x)).numpy()
    close(nchw(ours(jnp.asarray(x.transpose(0, 2, 3, 4, 1)))), ref, tol=1e-6)


@pytest.mark.parametrize("size", [(64, 64, 64), (128, 128, 128), (40, 50, 33)])
def test_trilinear_upsampling_matches_pytorch(size):
    x = np.random.default_rng(7).standard_normal((2, 1, 16, 16, 16)).astype(np.float32)
    ref = torch.nn.functional.interpolate(t(x), size=size, mode="trilinear", align_corners=False)
    np.testing.assert_allclose(
        np.asarray(upsample_logits(jnp.asarray(x), size)), ref.numpy(), atol=2e-6
    )


@pytest.mark.parametrize("size", [(128, 128, 128), (40, 50, 33)])
def test_trilinear_upsampling_gradient_matches_pytorch(size):
    """The hand-written backward pass (transposed interpolation matrices) = PyTorch's."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 1, 16, 16, 16)).astype(np.float32)
    w = rng.standard_normal((2, 1, *size)).astype(np.float32)
    xt = t(x).requires_grad_(True)
    up = torch.nn.functional.interpolate(xt, size=size, mode="trilinear", align_corners=False)
    (up * t(w)).sum().backward()
    ours = jax.grad(lambda v: jnp.sum(upsample_logits(v, size) * w))(jnp.asarray(x))
    ref = xt.grad.numpy()  # sums of ~512 products: compare at float32 rounding of the scale
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=4e-6 * np.abs(ref).max())


@pytest.mark.parametrize(("n", "out"), [(32, 128), (16, 32), (1, 4), (5, 15), (32, 96), (7, 3)])
def test_linear_resize_equals_two_tap_gather_bitwise(n, out):
    """The slice form of integer factors and the gather form compute identical bits."""
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, n, 3, n)).astype(np.float32))
    scale = np.float32(n) / np.float32(out)
    src = np.maximum((np.arange(out, dtype=np.float32) + 0.5) * scale - 0.5, 0).astype(np.float32)
    i0 = np.floor(src).astype(np.int32)
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    w0 = np.float32(1) - w1
    for axis in (1, 3):
        shape = [1, 1, 1, 1]
        shape[axis] = out
        ref = w0.reshape(shape) * jnp.take(x, i0, axis=axis) + w1.reshape(shape) * jnp.take(
            x, i1, axis=axis
        )
        np.testing.assert_array_equal(np.asarray(upsample_linear_axis(x, axis, out)), ref)


def test_gelu_matches_pytorch():
    """The exact GELU's values and its input-only backward pass = PyTorch's, to float32
    rounding (values within a few ulp of the output, 1e-6 in the far negative tail)."""
    x = np.concatenate(
        [np.linspace(-9, 9, 2001), np.random.default_rng(10).standard_normal(999) * 3]
    ).astype(np.float32)
    xt = t(x).requires_grad_(True)
    yt = torch.nn.functional.gelu(xt)
    yt.sum().backward()
    ours = jax.grad(lambda v: jnp.sum(gelu(v)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), xt.grad.numpy(), rtol=1e-6, atol=1e-6)
    values = np.asarray(gelu(jnp.asarray(x)))
    np.testing.assert_allclose(values, yt.detach().numpy(), rtol=4e-7, atol=1e-6)
    np.testing.assert_allclose(values, jax.nn.gelu(x, approximate=False), rtol=4e-7, atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    # bfloat16 inputs: PyTorch's float32 GELU of the same inputs, rounded once (within one
    # bfloat16 step, also in the negative tail where 1 + erf cancels)
    yb = gelu(xb)
    assert yb.dtype == jnp.bfloat16
    ref = torch.nn.functional.gelu(t(np.asarray(xb, np.float32))).numpy()
    np.testing.assert_allclose(np.asarray(yb, np.float32), ref, rtol=2**-8, atol=1e-6)
    gb = jax.grad(lambda v: jnp.sum(gelu(v).astype(jnp.float32)))(xb)
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gb, np.float32), xt.grad.numpy(), atol=2e-2)


def test_gelu_tanh_matches_pytorch():
    """`gelu="tanh"`: values and gradient = PyTorch's `approximate="tanh"` GELU, and within
    5e-4 of the exact one."""
    x = np.concatenate(
        [np.linspace(-9, 9, 2001), np.random.default_rng(11).standard_normal(999) * 3]
    ).astype(np.float32)
    xt = t(x).requires_grad_(True)
    yt = torch.nn.functional.gelu(xt, approximate="tanh")
    yt.sum().backward()
    g = jax.grad(lambda v: jnp.sum(gelu_tanh(v)))(jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(gelu_tanh(jnp.asarray(x))), yt.detach().numpy(), atol=1e-6
    )
    # atol: in the far negative tail PyTorch's tanh rounds to -1 and its gradient to 0
    # where ours (sigmoid form) keeps the ~1e-6 value.
    np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), rtol=1e-5, atol=5e-6)
    exact = np.asarray(gelu(jnp.asarray(x)))
    assert np.abs(np.asarray(gelu_tanh(jnp.asarray(x))) - exact).max() < 5e-4
