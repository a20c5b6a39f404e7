"""Tests of the jit-able training and evaluation steps on the tiny 64^3 model (CPU).

The steps are compiled at XLA backend optimisation level 0: same results, a fraction of the
compile time of the unrolled decoder backward passes on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sammed3d_jax.model import Sam3D, Sam3DConfig, abstract_sam3d
from sammed3d_jax.train.optim import OptimConfig, make_optimizer, param_path
from sammed3d_jax.train.step import (
    TrainConfig,
    TrainState,
    global_norm,
    init_train_state,
    make_eval_step,
    make_loss_fn,
    make_train_step,
    normalize_images,
)

F32 = jnp.float32
FAST = {"xla_backend_optimization_level": 0}
S = 64
OPTIM = OptimConfig(lr=3e-3, prompt_decoder_lr_mult=1.0, schedule="constant", weight_decay=0.0)


def sphere_batch(seed: int = 0, batch: int = 2) -> dict[str, jax.Array]:
    """Bright spheres in noise with their masks."""
    rs = np.random.RandomState(seed)
    z, y, x = np.mgrid[:S, :S, :S]
    centres = [(30, 34, 32, 12), (36, 28, 30, 10), (26, 30, 38, 9)]
    lab = np.stack(
        [((z - c0) ** 2 + (y - c1) ** 2 + (x - c2) ** 2 < r**2) for c0, c1, c2, r in centres]
    )[:batch].astype(np.uint8)
    img = rs.normal(0.0, 0.3, lab.shape).astype(np.float32) + 1.0 + 2.0 * lab
    return {"image": jnp.asarray(img), "label": jnp.asarray(lab)}


def host_init(cfg: Sam3DConfig, seed: int = 0) -> Sam3D:
    """A randomly initialised model built on the host (no per-initialiser compiles).

    PyTorch-like: kernels U(+-1/sqrt(fan_in)), biases and position tables 0, norm scales 1,
    embeddings and the Fourier matrix N(0, 1).
    """
    abstract = abstract_sam3d(cfg)
    graphdef, state = nnx.split(abstract)
    rs = np.random.RandomState(seed)

    def init(path, leaf):
        name = param_path(path)
        shape = leaf.shape
        if name.endswith("kernel"):
            bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
            x = rs.uniform(-bound, bound, shape)
        elif name.endswith("scale"):
            x = np.ones(shape)
        elif name.endswith("embedding") or name.endswith("gaussian_matrix"):
            x = rs.normal(size=shape)
        else:  # biases, pos_embed, rel_pos tables
            x = np.zeros(shape)
        return jnp.asarray(x, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


@pytest.fixture(scope="module")
def model():
    return host_init(Sam3DConfig.from_variant("tiny"))


@pytest.fixture(scope="module")
def trainer(model):
    """(graphdef, tx, jitted step, trace counter) for the default click loop."""
    tx = make_optimizer(model, OPTIM)
    graphdef, _ = init_train_state(model, tx)
    traces = []
    inner = make_train_step(graphdef, tx, TrainConfig(), OPTIM)

    def counted(state, batch, rng):
        traces.append(1)
        return inner(state, batch, rng)

    step = jax.jit(counted, donate_argnums=0, compiler_options=FAST)
    return graphdef, tx, step, traces


def fresh_state(model, tx) -> TrainState:
    _, state = init_train_state(model, tx)
    return jax.tree.map(jnp.copy, state)  # donation must not consume the model's arrays


def named(tree) -> dict[str, np.ndarray]:
    return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_one_step_and_compiles_once(model, trainer):
    _, tx, step, traces = trainer
    state = fresh_state(model, tx)
    state, metrics = step(state, sphere_batch(batch=1), jax.random.key(0))
    expected = {
        "loss",
        "loss_last",
        "dice",
        "grad_norm",
        "param_norm",
        "update_norm",
        "clicks_valid_fraction",
        "lr/image_encoder",
        "lr/prompt_encoder",
        "lr/mask_decoder",
    }
    assert set(metrics) == expected
    for k, v in metrics.items():
        assert v.shape == () and v.dtype == jnp.float32 and np.isfinite(float(v)), k
    assert int(state.step) == 1
    assert float(metrics["clicks_valid_fraction"]) == 1.0
    assert 0.0 <= float(metrics["dice"]) <= 1.0
    assert float(metrics["grad_norm"]) > 0 and float(metrics["update_norm"]) > 0
    np.testing.assert_allclose(float(metrics["lr/image_encoder"]), OPTIM.lr, rtol=1e-6)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    # Same shapes, new rng and batch values: no retrace, no recompile.
    for i in range(2):
        state, metrics = step(state, sphere_batch(seed=i + 1, batch=1), jax.random.key(i + 1))
    assert int(state.step) == 3
    assert step._cache_size() == 1
    assert len(traces) == 1


def test_a_batch_without_a_valid_sample_changes_no_weight(model):
    """Every sample unreadable (all masked): AdamW's momentum and weight decay would still
    move the weights; the step leaves them as they are."""
    tx = make_optimizer(model, OPTIM)
    graphdef, _ = init_train_state(model, tx)
    one_click = TrainConfig(num_clicks=1, no_point_low=0, no_point_high=0)
    step = jax.jit(make_train_step(graphdef, tx, one_click, OPTIM), compiler_options=FAST)
    batch, key = sphere_batch(batch=1), jax.random.key(0)
    state = fresh_state(model, tx)
    state, _ = step(state, dict(batch, sample_mask=jnp.asarray([True])), key)  # moments != 0
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    skipped, metrics = step(state, dict(batch, sample_mask=jnp.asarray([False])), key)
    assert int(skipped.step) == 2 and float(metrics["update_norm"]) == 0.0
    for x, y in zip(before, jax.tree.leaves(skipped.params), strict=True):
        np.testing.assert_array_equal(np.asarray(y), x)
    learned, metrics = step(skipped, dict(batch, sample_mask=jnp.asarray([True])), key)
    assert float(metrics["update_norm"]) > 0
    assert any(np.any(np.asarray(y) != x) for x, y in zip(before, jax.tree.leaves(learned.params)))


def test_loss_decreases(model, trainer):
    _, tx, step, _ = trainer
    state = fresh_state(model, tx)
    batch = sphere_batch(batch=1)
    losses, dice = [], []
    for _ in range(30):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
        dice.append(float(metrics["dice"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert dice[-1] > 0.5, dice


@pytest.fixture(scope="module")
def loss_and_grad(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = jax.jit(
        jax.value_and_grad(make_loss_fn(graphdef, TrainConfig()), has_aux=True),
        compiler_options=FAST,
    )
    return fn, params, rest


def test_gradient_flow_and_padding(loss_and_grad):
    fn, params, rest = loss_and_grad
    batch = dict(sphere_batch(), sample_mask=jnp.asarray([True, False]))
    (loss, aux), grads = fn(params, rest, batch, jax.random.key(0))
    assert np.isfinite(float(loss)) and np.isfinite(float(aux["dice"]))
    g = named(grads)
    zero = [k for k, v in g.items() if not np.any(v)]
    for k in zero:
        assert (
            "output_hypernetworks_mlps.1." in k
            or "output_hypernetworks_mlps.2." in k
            or "output_hypernetworks_mlps.3." in k
            or "iou_prediction_head." in k
            or "no_mask_embed" in k
            or "point_embeddings.0" in k  # no negative click in this draw
        ), k
    for i in (1, 2, 3):
        assert not any(np.any(v) for k, v in g.items() if f"output_hypernetworks_mlps.{i}." in k)
    assert all(not np.any(v) for k, v in g.items() if "iou_prediction_head" in k)
    assert not np.any(g["prompt_encoder.no_mask_embed.embedding"])
    # Everything else trains: encoder, hypernetwork 0, mask tokens 1-3 via attention, and the
    # mask-prompt path (the previous logits are fed back undetached).
    for k in (
        "image_encoder.patch_embed.proj.kernel",
        "image_encoder.blocks.0.attn.rel_pos_d",
        "mask_decoder.output_hypernetworks_mlps.0.layers.0.kernel",
        "mask_decoder.iou_token.embedding",
        "prompt_encoder.mask_downscaling.0.kernel",
        "prompt_encoder.point_embeddings.1.embedding",
        "prompt_encoder.not_a_point_embed.embedding",
    ):
        assert np.any(g[k]), k
    assert np.all(np.any(g["mask_decoder.mask_tokens.embedding"] != 0, axis=1))
    assert not any("positional_encoding_gaussian_matrix" in k for k in g)

    # The padded sample: an empty label (no click possible) and garbage intensities change
    # nothing.
    pad = dict(batch, image=batch["image"].at[1].set(1e4), label=batch["label"].at[1].set(0))
    (loss2, aux2), grads2 = fn(params, rest, pad, jax.random.key(0))
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(aux2["dice"]), float(aux["dice"]), rtol=1e-6)
    assert float(aux["clicks_valid_fraction"]) == float(aux2["clicks_valid_fraction"]) == 1.0
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-7)


@pytest.mark.slow  # non-default options; keeps the default run inside its time budget
def test_multi_click_with_remat_runs(model):
    cfg = TrainConfig(
        multi_click=True, num_clicks=4, no_point_low=1, no_point_high=2, remat_clicks=True
    )
    tx = make_optimizer(model, OPTIM)
    graphdef, state = init_train_state(model, tx)
    step = jax.jit(make_train_step(graphdef, tx, cfg), compiler_options=FAST)
    state, metrics = step(state, sphere_batch(batch=1), jax.random.key(0))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert "lr/image_encoder" not in metrics  # no OptimConfig given
    assert int(state.step) == 1


def test_unrolled_click_loop_matches_scan(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = sphere_batch(batch=1)
    results = []
    for loop in ("scan", "unroll"):
        cfg = TrainConfig(num_clicks=3, no_point_low=1, no_point_high=1, click_loop=loop)
        assert cfg.unroll == (loop == "unroll")
        fn = jax.jit(
            jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True), compiler_options=FAST
        )
        results.append(fn(params, rest, batch, jax.random.key(0)))
    ((l0, a0), g0), ((l1, a1), g1) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for k in a0:
        np.testing.assert_allclose(float(a1[k]), float(a0[k]), rtol=1e-5, err_msg=k)
    # Per-leaf scale, floored for leaves whose exact gradient is zero (rounding noise only).
    floor = 1e-3 * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g0))
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        scale = max(float(np.max(np.abs(x))), floor)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-4 * scale)


def test_gpu_forms_give_the_same_loss_and_gradients(monkeypatch):
    """The forms chosen on GPUs only (unrolled log-sum-exps in the padded keys' closed form,
    decoder tokens padded with masked fillers, block-diagonal head maps in the decoder's
    cross-attention), all switched on here on the CPU: the step's loss, metrics and
    gradients are those of the CPU forms."""
    import sammed3d_jax.model.image_encoder as image_encoder
    import sammed3d_jax.model.mask_decoder as mask_decoder
    import sammed3d_jax.model.transformer as transformer
    from tests.conftest import randomize_params

    # Two decoder heads: the cross-attention takes its few-token paths (2 heads x 8 tokens
    # < 24 channels); every parameter random, biases included.
    gpu_model = randomize_params(
        abstract_sam3d(Sam3DConfig.from_variant("tiny", decoder_num_heads=2)), seed=5, scale=0.2
    )
    graphdef, params, rest = nnx.split(gpu_model, nnx.Param, ...)
    batch = sphere_batch(batch=2)
    cfg = TrainConfig(num_clicks=3, no_point_low=1, no_point_high=1)
    results = []
    for gpu in (False, True):
        monkeypatch.setattr(image_encoder, "unrolled_logsumexp", lambda g=gpu: g)
        monkeypatch.setattr(mask_decoder, "token_multiple", lambda g=gpu: 8 if g else 1)
        monkeypatch.setattr(transformer, "heads_as_blocks", lambda g=gpu: g)
        fn = jax.jit(
            jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True), compiler_options=FAST
        )
        results.append(fn(params, rest, batch, jax.random.key(2)))
    ((l0, a0), g0), ((l1, a1), g1) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for k in a0:
        np.testing.assert_allclose(float(a1[k]), float(a0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    floor = 1e-3 * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g0))
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        scale = max(float(np.max(np.abs(x))), floor)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-4 * scale)


def test_gradients_equal_plain_autodiff(model, monkeypatch):
    """The hand-written backward passes (GELU, upsampling, relative-position gathers) and the
    rematerialised loss and upscaling give the gradients of plain automatic differentiation."""
    import sammed3d_jax.model.common as common
    import sammed3d_jax.model.image_encoder as image_encoder
    import sammed3d_jax.model.mask_decoder as mask_decoder
    import sammed3d_jax.model.prompt_encoder as prompt_encoder
    import sammed3d_jax.train.step as step_module

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = sphere_batch(batch=2)
    cfg = TrainConfig(num_clicks=3, no_point_low=1, no_point_high=1)

    def grads():
        fn = jax.jit(
            jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True), compiler_options=FAST
        )
        return fn(params, rest, batch, jax.random.key(1))

    (l0, _), g0 = grads()

    def plain_gelu(x):
        return jax.nn.gelu(x, approximate=False)

    def plain_resize(x, axis, in_size, out_size):
        return common._blend_axis(x, axis, out_size)

    def plain_take_rows(values, idx):
        idx = np.asarray(idx)
        idx = idx.reshape((1,) * (values.ndim - idx.ndim) + idx.shape)
        return jnp.take_along_axis(values, jnp.asarray(idx), axis=-1)

    for mod in (common, mask_decoder, prompt_encoder):
        monkeypatch.setattr(mod, "gelu", plain_gelu)
    monkeypatch.setattr(common, "_resize_axis", plain_resize)
    monkeypatch.setattr(image_encoder, "take_rows", plain_take_rows)
    monkeypatch.setattr(jax, "checkpoint", lambda f, **_: f)
    assert step_module.upsample_logits is common.upsample_logits
    (l1, _), g1 = grads()

    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    floor = 1e-3 * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g1))
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        scale = max(float(np.max(np.abs(x))), floor)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-4 * scale)


def test_bfloat16_compute_float32_params(model):
    cfg16 = Sam3DConfig.from_variant("tiny", dtype="bfloat16")
    graphdef16 = nnx.graphdef(abstract_sam3d(cfg16))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    model16 = nnx.merge(graphdef16, params, rest)
    tx = make_optimizer(model16, OPTIM)
    graphdef, state = init_train_state(model16, tx)
    step = jax.jit(
        make_train_step(graphdef, tx, TrainConfig(num_clicks=2, no_point_low=0, no_point_high=0)),
        compiler_options=FAST,
    )
    state, metrics = step(state, sphere_batch(batch=1), jax.random.key(0))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_eval_step(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ev = jax.jit(make_eval_step(graphdef, num_clicks=5), compiler_options=FAST)
    out = ev((params, rest), sphere_batch(batch=3), jax.random.key(0))
    d = np.asarray(out["dice_per_click"])
    assert d.shape == (3, 5) and d.dtype == np.float32
    assert np.all((d >= 0) & (d <= 1))


def test_normalize_images():
    rs = np.random.RandomState(0)
    img = rs.normal(0.5, 2.0, (3, 4, 5, 6)).astype(np.float32)
    img[2] = -1.0  # no positive voxel: left un-normalised (mean 0, std 1)
    got = np.asarray(normalize_images(jnp.asarray(img), "per_volume"))
    for b in range(2):
        v = img[b][img[b] > 0].astype(np.float64)
        np.testing.assert_allclose(got[b], (img[b] - v.mean()) / v.std(ddof=1), rtol=1e-5)
    np.testing.assert_array_equal(got[2], img[2])
    pooled = img[:2][img[:2] > 0].astype(np.float64)
    want = (img - pooled.mean()) / pooled.std(ddof=1)
    mask = jnp.asarray([True, True, False])
    got_b = np.asarray(normalize_images(jnp.asarray(img), "batch", mask))
    np.testing.assert_allclose(got_b, want, rtol=1e-5, atol=1e-6)
    # Without the mask the third volume has no positive voxel either: same statistics.
    np.testing.assert_allclose(np.asarray(normalize_images(jnp.asarray(img), "batch")), want, 1e-5)


def test_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(normalization="global")
    with pytest.raises(ValueError):
        TrainConfig(no_point_low=5, no_point_high=2)
    with pytest.raises(ValueError, match="click_loop"):
        TrainConfig(click_loop="unrolled")


def test_click_loop_auto_unrolls_on_gpus_only(monkeypatch):
    for backend, unrolled in (("gpu", True), ("cpu", False), ("tpu", False)):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert TrainConfig().unroll is unrolled
        assert TrainConfig(click_loop="scan").unroll is False
        assert TrainConfig(click_loop="unroll").unroll is True


def test_global_norm_matches_a_float64_sum():
    rng = np.random.default_rng(0)
    tree = {
        "blocks": [{"w": jnp.asarray(rng.standard_normal((4, 3)), F32)} for _ in range(3)],
        "bias": jnp.asarray(rng.standard_normal(3), F32),
        "half": jnp.asarray(rng.standard_normal((4, 3)), jnp.bfloat16),
        "scalar": jnp.float32(2.5),
        "empty": jnp.zeros((0, 5), F32),
    }
    # float32 accumulation even for the bfloat16 leaf (optax squares it in bfloat16)
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    np.testing.assert_allclose(float(jax.jit(global_norm)(tree)), want, rtol=1e-6)
    f32_tree = {k: v for k, v in tree.items() if k != "half"}
    np.testing.assert_allclose(
        float(global_norm(f32_tree)), float(optax.global_norm(f32_tree)), rtol=1e-6
    )
    assert float(global_norm({})) == 0.0


def test_global_norm_groups_leaves_by_shape_dtype_and_sharding_annotation():
    def param(value, axes):
        return nnx.Param(jnp.asarray(value, F32), logical_axes=axes)

    tree = nnx.State(
        {
            "a": param(np.ones((4, 3)), ("embed", "mlp")),
            "b": param(np.full((4, 3), 2.0), ("embed", "mlp")),
            "c": param(np.full((4, 3), 3.0), ("mlp", "embed")),  # laid out differently
            "d": param(np.ones(3), ("mlp",)),
        }
    )
    np.testing.assert_allclose(float(global_norm(tree)), np.sqrt(12 * (1 + 4 + 9) + 3), 1e-6)
    # one reduction per group: {a, b}, {c}, {d}
    assert jax.jit(global_norm).lower(tree).as_text().count("stablehlo.reduce") == 3


def test_normalization_groups_pool_consecutive_samples():
    rng = np.random.default_rng(1)
    img = rng.normal(50.0, 30.0, (6, 4, 4, 4)).astype(np.float32)
    img[2] *= 5.0  # groups with different statistics
    mask = np.array([True, True, False, True, True, True])
    got = np.asarray(normalize_images(jnp.asarray(img), "batch", jnp.asarray(mask), group=3))
    for g in range(2):
        sl = slice(3 * g, 3 * g + 3)
        want = normalize_images(jnp.asarray(img[sl]), "batch", jnp.asarray(mask[sl]))
        np.testing.assert_allclose(got[sl], np.asarray(want), rtol=1e-5, atol=1e-5)
    whole = normalize_images(jnp.asarray(img), "batch", jnp.asarray(mask))
    np.testing.assert_allclose(
        np.asarray(normalize_images(jnp.asarray(img), "batch", jnp.asarray(mask), group=6)),
        np.asarray(whole),
    )
    with pytest.raises(ValueError, match="must divide the batch size 6"):
        normalize_images(jnp.asarray(img), "batch", group=4)
    with pytest.raises(ValueError, match="normalization_group"):
        TrainConfig(normalization_group=-1)
    with pytest.raises(ValueError, match="normalization_group"):
        TrainConfig(normalization_group=True)
    with pytest.raises(ValueError, match="needs normalization='batch'"):
        TrainConfig(normalization="per_volume", normalization_group=2)
