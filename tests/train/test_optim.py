"""Tests of sammed3d_jax.train.optim: groups, schedules, decay mask, freezing, accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sammed3d_jax.model import Sam3DConfig, abstract_sam3d
from sammed3d_jax.train.optim import (
    OptimConfig,
    decay_mask,
    group_labels,
    learning_rates,
    make_optimizer,
    param_path,
)


@pytest.fixture(scope="module")
def params():
    """The tiny model's parameter tree filled with host random numbers (no init compiles)."""
    abstract = nnx.state(abstract_sam3d(Sam3DConfig.from_variant("tiny")), nnx.Param)
    rs = np.random.RandomState(0)
    return jax.tree.map(lambda s: jnp.asarray(rs.uniform(-0.5, 0.5, s.shape), s.dtype), abstract)


def named(tree) -> dict[str, np.ndarray]:
    return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def named_labels(tree) -> dict[str, object]:
    return {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def group_of(name: str) -> str:
    return name.split(".", 1)[0]


def run(tx, params, grads, n):
    """n optimizer steps with fixed gradients; the list of update trees."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for _ in range(n):
        upd, state = step(grads, state, params)
        params = optax.apply_updates(params, upd)
        out.append(named(upd))
    return out, params


def test_labels_and_buffers(params):
    labels = named_labels(group_labels(params, OptimConfig()))
    assert set(labels.values()) == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert all(group_of(k) == v for k, v in labels.items())
    assert not any("positional_encoding_gaussian_matrix" in k for k in labels)  # a buffer
    frozen = named_labels(group_labels(params, OptimConfig(freeze_image_encoder=True)))
    assert {v for k, v in frozen.items() if group_of(k) == "image_encoder"} == {"frozen"}


def test_decay_mask(params):
    mask = named_labels(decay_mask(params, OptimConfig()))
    off = sorted(k for k, v in mask.items() if not v)
    assert off and all(("iou_prediction_head" in k) or ("no_mask_embed" in k) for k in off)
    assert any("no_mask_embed" in k for k in off)
    assert sum("iou_prediction_head" in k for k in off) == 6  # 3 layers x (kernel, bias)
    # Biases, norms, embeddings, position tables and the unused hypernetworks decay.
    for part in ("bias", "norm", "pos_embed", "rel_pos", "mask_tokens", "output_hypernetworks"):
        assert any(part in k and v for k, v in mask.items()), part
    assert all(named_labels(decay_mask(params, OptimConfig(original_decay_mask=False))).values())


@pytest.mark.parametrize("original", [True, False])
def test_decay_applied_per_mask(params, original):
    """Zero gradients: the update is -lr * wd * p where decay applies, else exactly 0."""
    cfg = OptimConfig(lr=1e-2, schedule="constant", original_decay_mask=original)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (upd,), _ = run(make_optimizer(params, cfg), params, zeros, 1)
    p = named(params)
    for k, u in upd.items():
        lr = cfg.lr * (1.0 if group_of(k) == "image_encoder" else 0.1)
        exempt = original and ("iou_prediction_head" in k or "no_mask_embed" in k)
        want = np.zeros_like(p[k]) if exempt else -lr * cfg.weight_decay * p[k]
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg=k)


def expected_lr(cfg: OptimConfig, step: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps)
    end = cfg.lr * cfg.min_lr_ratio
    return end + (cfg.lr - end) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


SCHEDULES = [
    OptimConfig(schedule="constant"),
    OptimConfig(schedule="multistep", milestones=(2, 4)),
    OptimConfig(schedule="multistep", milestones=(3, 3), gamma=0.5),
    OptimConfig(schedule="warmup_cosine", warmup_steps=2, total_steps=5, min_lr_ratio=0.1),
]


@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: c.schedule)
def test_group_learning_rates(params, cfg):
    """The optimizer's real step sizes follow the schedule in every group.

    With weight decay 0 and constant unit gradients, Adam's bias-corrected update is
    exactly -lr(t) / (1 + eps) for every parameter.
    """
    cfg = cfg.replace(weight_decay=0.0)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = run(make_optimizer(params, cfg), params, ones, 6)
    for t, upd in enumerate(updates):
        lrs = learning_rates(cfg, t)
        for group in ("image_encoder", "prompt_encoder", "mask_decoder"):
            want = expected_lr(cfg, t) * (1.0 if group == "image_encoder" else 0.1)
            np.testing.assert_allclose(float(lrs[f"lr/{group}"]), want, rtol=1e-5, atol=1e-12)
            got = {-u.ravel()[0] for k, u in upd.items() if group_of(k) == group}
            np.testing.assert_allclose(sorted(got), [want / (1 + cfg.eps)] * len(got), 5e-5)


def test_default_schedule_milestones():
    cfg = OptimConfig()
    for step, factor in [(0, 1.0), (119, 1.0), (120, 0.1), (179, 0.1), (180, 0.01)]:
        lrs = learning_rates(cfg, step)
        np.testing.assert_allclose(float(lrs["lr/image_encoder"]), 8e-4 * factor, rtol=1e-6)
        np.testing.assert_allclose(float(lrs["lr/mask_decoder"]), 8e-5 * factor, rtol=1e-6)
        np.testing.assert_allclose(float(lrs["lr/prompt_encoder"]), 8e-5 * factor, rtol=1e-6)


def test_frozen_encoder_is_bitwise_unchanged(params):
    cfg = OptimConfig(lr=1e-2, schedule="constant", freeze_image_encoder=True)
    rs = np.random.RandomState(0)
    grads = jax.tree.map(lambda x: jnp.asarray(rs.normal(size=x.shape), x.dtype), params)
    _, new = run(make_optimizer(params, cfg), params, grads, 2)
    before, after = named(params), named(new)
    for k in before:
        if group_of(k) == "image_encoder":
            assert np.array_equal(before[k].view(np.uint32), after[k].view(np.uint32)), k
        else:
            assert not np.array_equal(before[k], after[k]), k
    assert float(learning_rates(cfg, 0)["lr/image_encoder"]) == 0.0


def test_clipping_ignores_frozen_gradients(params):
    """With eps = 1 Adam is scale-sensitive, so the clipping norm shows in the update."""
    base = OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.0, eps=1.0)
    small = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
    huge_enc = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, 1e3 if group_of(param_path(p)) == "image_encoder" else 0.01),
        params,
    )
    frozen = base.replace(freeze_image_encoder=True, grad_clip_norm=0.05)
    (u_small,), _ = run(make_optimizer(params, frozen), params, small, 1)
    (u_huge,), _ = run(make_optimizer(params, frozen), params, huge_enc, 1)
    for k in u_small:
        np.testing.assert_array_equal(u_small[k], u_huge[k], err_msg=k)
    # Not frozen: the huge encoder gradients dominate the norm and shrink the rest.
    (u_all,), _ = run(
        make_optimizer(params, base.replace(grad_clip_norm=0.05)), params, huge_enc, 1
    )
    k = next(k for k in u_all if group_of(k) == "mask_decoder")
    assert np.abs(u_all[k]).max() < 0.1 * np.abs(u_small[k]).max()


def test_accumulation_matches_full_batch(params):
    """k = 2 over two half batches == one step on the full batch (mean loss)."""
    rs = np.random.RandomState(0)
    data = jnp.asarray(rs.normal(size=(8, 5)), jnp.float32)
    leaves = jax.tree.leaves(params)
    proj = [jnp.asarray(rs.normal(size=(5,)) / math.sqrt(x.size), jnp.float32) for x in leaves]

    def grad(p, batch):
        """Gradient of the mean over ``batch`` of a per-sample loss coupling every leaf:
        ``l(p, x) = sum_leaves (x . w_leaf + s_leaf)^2`` with ``s_leaf = mean(sin(leaf))``."""
        batch = np.asarray(batch, np.float64)
        out = []
        for x, w in zip(jax.tree.leaves(p), proj):
            x = np.asarray(x, np.float64)
            s = np.sin(x).mean()
            c = np.mean(2.0 * (batch @ np.asarray(w, np.float64) + s))
            out.append(jnp.asarray(c * np.cos(x) / x.size, jnp.float32))
        return jax.tree.unflatten(jax.tree.structure(p), out)

    cfg = OptimConfig(lr=1e-3, schedule="multistep", milestones=(1,))
    full_tx = make_optimizer(params, cfg)
    acc_tx = make_optimizer(params, cfg.replace(accumulation_steps=2))
    assert isinstance(acc_tx, optax.GradientTransformation)

    upd_full, _ = jax.jit(full_tx.update)(grad(params, data), full_tx.init(params), params)
    acc_update = jax.jit(acc_tx.update)
    state = acc_tx.init(params)
    u1, state = acc_update(grad(params, data[:4]), state, params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u1))
    u2, state = acc_update(grad(params, data[4:]), state, params)
    a, b = named(upd_full), named(u2)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-9, err_msg=k)
    # The inner schedule counts optimizer steps: the next window uses the decayed lr.
    _, state = acc_update(grad(params, data[:4]), state, params)
    u4, state = acc_update(grad(params, data[4:]), state, params)
    ratio = (
        np.abs(named(u4)["image_encoder.patch_embed.proj.bias"]).max()
        / np.abs(b["image_encoder.patch_embed.proj.bias"]).max()
    )
    assert ratio < 0.2


def test_config_validation():
    with pytest.raises(ValueError):
        OptimConfig(schedule="cosine")
    with pytest.raises(ValueError):
        OptimConfig(accumulation_steps=0)
    with pytest.raises(ValueError):
        OptimConfig(schedule="warmup_cosine", warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        OptimConfig(grad_clip_norm=-1.0)


def test_zero_clip_norm_means_no_clipping(params):
    """Config files spell "off" as 0: it must not clip every update to zero."""
    base = OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.0)
    assert base.replace(grad_clip_norm=0.0).grad_clip_norm is None
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    (u_zero,), _ = run(make_optimizer(params, base.replace(grad_clip_norm=0.0)), params, grads, 1)
    (u_none,), _ = run(make_optimizer(params, base), params, grads, 1)
    for k in u_none:
        assert np.abs(u_none[k]).max() > 0, k
        np.testing.assert_array_equal(u_zero[k], u_none[k], err_msg=k)
