"""Tests of sammed3d_jax.train.losses against independent NumPy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sammed3d_jax.train.losses import bce_with_logits, dice_ce_loss, dice_loss, dice_score


def ref_dice_ce(logits: np.ndarray, target: np.ndarray, ce_weight=1.0, dice_weight=1.0):
    """MONAI DiceCELoss(sigmoid=True, squared_pred=True) written out in float64."""
    x = logits.astype(np.float64).reshape(len(logits), -1)
    g = target.astype(np.float64).reshape(len(target), -1)
    p = 1.0 / (1.0 + np.exp(-x))
    dice = 1.0 - (2.0 * (p * g).sum(1) + 1e-5) / ((p**2).sum(1) + (g**2).sum(1) + 1e-5)
    bce = np.logaddexp(0.0, x) - x * g  # -[g log p + (1-g) log(1-p)]
    return dice_weight * dice.mean() + ce_weight * bce.mean()


def ref_hard_dice(logits, target, threshold):
    out = []
    for x, g in zip(logits, target):
        p = x > threshold
        t = g > 0
        s = p.sum() + t.sum()
        out.append(np.nan if s == 0 else 2.0 * (p & t).sum() / s)
    return np.array(out)


@pytest.fixture
def sample():
    rs = np.random.RandomState(0)
    logits = rs.normal(0.0, 3.0, (4, 6, 7, 5)).astype(np.float32)
    target = (rs.uniform(size=(4, 6, 7, 5)) < 0.3).astype(np.uint8)
    target[2] = 0  # an empty target
    target[3] = 1  # a full target
    return logits, target


@pytest.mark.parametrize("ce_weight", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("dice_weight", [1.0, 2.0])
def test_dice_ce_matches_numpy(sample, ce_weight, dice_weight):
    logits, target = sample
    got = dice_ce_loss(jnp.asarray(logits), jnp.asarray(target), ce_weight, dice_weight)
    want = ref_dice_ce(logits, target, ce_weight, dice_weight)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_monai_closed_form():
    """Logits 0 everywhere: p = 1/2, Dice = 1 - (n + 1e-5) / (V/4 + n + 1e-5), BCE = log 2."""
    shape = (1, 4, 4, 4)
    v = 64
    target = np.zeros(shape, np.int64)
    target[0, :2] = 1  # n = 32
    n = 32
    logits = jnp.zeros(shape, jnp.float32)
    dice = 1.0 - (2 * 0.5 * n + 1e-5) / (0.25 * v + n + 1e-5)
    got = dice_ce_loss(logits, jnp.asarray(target))
    np.testing.assert_allclose(float(got), dice + math.log(2.0), rtol=1e-6)
    # MONAI < 1.3: the single-channel cross-entropy is 0, only Dice remains.
    got12 = dice_ce_loss(logits, jnp.asarray(target), ce_weight=0.0)
    np.testing.assert_allclose(float(got12), dice, rtol=1e-6)
    # An empty target and logits -> -inf: Dice -> 1 - 1e-5/1e-5 = 0 and BCE -> 0.
    empty = dice_ce_loss(jnp.full(shape, -100.0), jnp.zeros(shape))
    assert abs(float(empty)) < 1e-6


def test_parts_and_dtypes(sample):
    logits, target = sample
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = dice_ce_loss(lb, jnp.asarray(target))
    assert got.dtype == jnp.float32
    want = ref_dice_ce(np.asarray(lb.astype(jnp.float32)), target)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    d = dice_loss(jnp.asarray(logits), jnp.asarray(target))
    b = bce_with_logits(jnp.asarray(logits), jnp.asarray(target))
    assert d.shape == (4,) and b.shape == (4,)
    np.testing.assert_allclose(float(jnp.mean(d) + jnp.mean(b)), ref_dice_ce(logits, target), 1e-5)
    with pytest.raises(ValueError):
        dice_ce_loss(jnp.asarray(logits), jnp.asarray(target[:, :-1]))


def test_bce_is_stable_for_large_logits():
    x = jnp.asarray([[-200.0, 200.0, 0.0, 50.0]])
    y = jnp.asarray([[0.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(np.asarray(bce_with_logits(x, y)), [(math.log(2) + 50.0) / 4], 1e-6)


def test_sample_mask(sample):
    logits, target = sample
    mask = np.array([True, False, True, False])
    got = dice_ce_loss(jnp.asarray(logits), jnp.asarray(target), sample_mask=jnp.asarray(mask))
    want = ref_dice_ce(logits[mask], target[mask])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Float weights give a weighted mean of per-sample losses.
    w = np.array([1.0, 2.0, 0.0, 0.5], np.float32)
    per = np.array([ref_dice_ce(logits[i : i + 1], target[i : i + 1]) for i in range(4)])
    got_w = dice_ce_loss(jnp.asarray(logits), jnp.asarray(target), sample_mask=jnp.asarray(w))
    np.testing.assert_allclose(float(got_w), (w * per).sum() / w.sum(), rtol=1e-5)
    # Masked samples get no gradient; everything masked gives 0 without NaN.
    g = jax.grad(lambda x: dice_ce_loss(x, jnp.asarray(target), sample_mask=jnp.asarray(mask)))(
        jnp.asarray(logits)
    )
    assert np.all(np.asarray(g)[~mask] == 0) and np.all(np.isfinite(np.asarray(g)))
    zero = dice_ce_loss(jnp.asarray(logits), jnp.asarray(target), sample_mask=jnp.zeros(4, bool))
    assert float(zero) == 0.0


@pytest.mark.parametrize("threshold", [0.5, 0.0, -1.0])
def test_dice_score_matches_numpy(sample, threshold):
    logits, target = sample
    got = np.asarray(dice_score(jnp.asarray(logits), jnp.asarray(target), threshold))
    np.testing.assert_allclose(got, ref_hard_dice(logits, target, threshold), rtol=1e-6)


def test_dice_score_edge_cases():
    shape = (3, 2, 2, 2)
    target = np.zeros(shape, np.uint8)
    target[1, 0] = 1
    target[2, 0] = 1
    logits = np.full(shape, -1.0, np.float32)
    logits[2] = 0.3  # a logit of 0.3 is not foreground at the training threshold 0.5
    got = np.asarray(dice_score(jnp.asarray(logits), jnp.asarray(target)))
    assert math.isnan(got[0])  # both empty
    assert got[1] == 0.0 and got[2] == 0.0
    got1 = np.asarray(dice_score(jnp.asarray(logits), jnp.asarray(target), empty_value=1.0))
    assert got1[0] == 1.0
    # At the inference threshold (logit 0) the 0.3 logits cover the whole volume.
    got0 = np.asarray(dice_score(jnp.asarray(logits), jnp.asarray(target), threshold=0.0))
    np.testing.assert_allclose(got0[2], 2 * 4 / (8 + 4))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 20.0))
def test_loss_properties(seed, scale):
    rs = np.random.RandomState(seed)
    logits = (rs.normal(size=(2, 3, 4, 5)) * scale).astype(np.float32)
    target = (rs.uniform(size=(2, 3, 4, 5)) < rs.uniform()).astype(np.uint8)
    got = float(dice_ce_loss(jnp.asarray(logits), jnp.asarray(target)))
    np.testing.assert_allclose(got, ref_dice_ce(logits, target), rtol=2e-5, atol=1e-6)
    d = np.asarray(dice_score(jnp.asarray(logits), jnp.asarray(target), empty_value=1.0))
    assert np.all((d >= 0) & (d <= 1))
