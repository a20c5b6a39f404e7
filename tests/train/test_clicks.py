"""Tests of the on-device training click sampler (sammed3d_jax.train.clicks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sammed3d_jax.train import clicks
from sammed3d_jax.train.clicks import (
    error_regions,
    nth_voxel,
    sample_clicks,
    sample_from_region,
    uniform_index,
)

SHAPE = (3, 4, 5, 6)  # (B, S0, S1, S2)

_sample = jax.jit(sample_clicks, static_argnames="threshold")


def _masks(seed: int, p_gt: float, p_pred: float):
    rs = np.random.RandomState(seed)
    gt = (rs.uniform(size=SHAPE) < p_gt).astype(np.uint8)
    # Logits: +-1 around the 0.5 threshold; some exactly at 0.5 (not foreground).
    pred = rs.uniform(size=SHAPE) < p_pred
    logits = np.where(pred, 1.5, rs.choice([0.5, -1.0], size=SHAPE)).astype(np.float32)
    return logits, gt


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    p_gt=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
    p_pred=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
)
def test_clicks_lie_in_the_error_region(seed, p_gt, p_pred):
    logits, gt = _masks(seed, p_gt, p_pred)
    pts, labs, valid = _sample(jax.random.key(seed), jnp.asarray(logits), jnp.asarray(gt))
    pts, labs, valid = np.asarray(pts), np.asarray(labs), np.asarray(valid)
    assert pts.shape == (SHAPE[0], 3) and pts.dtype == np.int32
    assert labs.shape == (SHAPE[0],) and labs.dtype == np.int32
    pred = logits > 0.5
    true = gt > 0
    fn = true & ~pred
    fp = ~true & pred
    for b in range(SHAPE[0]):
        if not (fn[b].any() or fp[b].any()):
            assert not valid[b] and labs[b] == -1 and np.all(pts[b] == 0)
            continue
        assert valid[b]
        idx = tuple(pts[b])
        if labs[b] == 1:
            assert fn[b][idx]
        else:
            assert labs[b] == 0 and fp[b][idx]


def test_nth_voxel_is_c_order_rank():
    rs = np.random.RandomState(1)
    region = rs.uniform(size=SHAPE) < 0.3
    region[1] = False
    region[1, 2, 3, 4] = True
    flat = np.argwhere(region.reshape(SHAPE[0], -1))
    counts = region.reshape(SHAPE[0], -1).sum(1)
    f = jax.jit(nth_voxel)
    for k in range(int(counts.max())):
        got = np.asarray(f(jnp.asarray(region), jnp.full((SHAPE[0],), k, jnp.int32)))
        for b in range(SHAPE[0]):
            if k < counts[b]:
                want = np.argwhere(region[b])[k]
                np.testing.assert_array_equal(got[b], want)
    assert len(flat) == counts.sum()


def test_uniform_over_error_region():
    """Chi-square over many draws: every voxel of E equally likely, labels by FN / FP."""
    shape = (1, 3, 4, 5)
    gt = np.zeros(shape, np.uint8)
    gt[0, 1, 1:3, 1:4] = 1  # 6 voxels
    logits = np.full(shape, -3.0, np.float32)
    logits[0, 1, 1, 1:4] = 3.0  # 3 of them predicted: FN = 3
    logits[0, 0, 0, :] = 3.0  # 5 false positives
    logits[0, 2, 3, 4] = 0.5  # at the threshold: not predicted
    region, fn = error_regions(jnp.asarray(logits), jnp.asarray(gt))
    e = np.argwhere(np.asarray(region)[0])
    assert len(e) == 8
    n_draws = 16000
    keys = jax.random.split(jax.random.key(7), n_draws)
    draw = jax.jit(jax.vmap(lambda k: sample_clicks(k, jnp.asarray(logits), jnp.asarray(gt))))
    pts, labs, valid = (np.asarray(a)[:, 0] for a in draw(keys))
    assert valid.all()
    index = {tuple(v): i for i, v in enumerate(e)}
    hits = np.array([index[tuple(p)] for p in pts])  # KeyError if outside E
    counts = np.bincount(hits, minlength=len(e))
    assert stats.chisquare(counts).pvalue > 1e-3
    fn_np = np.asarray(fn)[0]
    np.testing.assert_array_equal(labs, [int(fn_np[tuple(p)]) for p in pts])
    np.testing.assert_allclose(labs.mean(), 3 / 8, atol=0.02)


def test_first_click_is_uniform_foreground_and_thresholds():
    shape = (2, 4, 4, 4)
    gt = np.zeros(shape, np.uint8)
    gt[:, 1:3, 1:3, 1:3] = 1
    zeros = jnp.zeros(shape)
    pts, labs, valid = _sample(jax.random.key(0), zeros, jnp.asarray(gt))
    assert np.all(np.asarray(valid)) and np.all(np.asarray(labs) == 1)
    assert all(gt[b][tuple(np.asarray(pts)[b])] for b in range(2))
    # Logits 0.3 over exactly the target: still all FN at the training threshold 0.5 ...
    logits = jnp.asarray(np.where(gt > 0, 0.3, -5.0).astype(np.float32))
    _, labs, valid = _sample(jax.random.key(1), logits, jnp.asarray(gt))
    assert np.all(np.asarray(valid)) and np.all(np.asarray(labs) == 1)
    # ... but a perfect prediction at the inference threshold 0: empty error region.
    pts, labs, valid = _sample(jax.random.key(1), logits, jnp.asarray(gt), threshold=0.0)
    assert not np.any(np.asarray(valid))
    assert np.all(np.asarray(labs) == -1) and np.all(np.asarray(pts) == 0)


def test_empty_error_region_mixed_batch():
    shape = (3, 4, 4, 4)
    gt = np.zeros(shape, np.uint8)
    gt[0, 0, 0, 0] = 1  # one voxel, predicted: perfect
    gt[2, 3, 3, 3] = 1  # one voxel, missed
    logits = np.full(shape, -1.0, np.float32)
    logits[0, 0, 0, 0] = 2.0
    logits[1, 2, 1, 0] = 2.0  # the only false positive
    pts, labs, valid = _sample(jax.random.key(3), jnp.asarray(logits), jnp.asarray(gt))
    np.testing.assert_array_equal(np.asarray(valid), [False, True, True])
    np.testing.assert_array_equal(np.asarray(labs), [-1, 0, 1])
    np.testing.assert_array_equal(np.asarray(pts), [[0, 0, 0], [2, 1, 0], [3, 3, 3]])


def test_sample_from_region_labels():
    region = jnp.zeros((1, 2, 2, 2), bool).at[0, 1, 0, 1].set(True)
    pts, labs, valid = sample_from_region(jax.random.key(0), region, region)
    np.testing.assert_array_equal(np.asarray(pts), [[1, 0, 1]])
    assert int(labs[0]) == 1 and bool(valid[0])


def test_uniform_index():
    f = jax.jit(uniform_index)
    n = jnp.asarray([1, 7, 7, 1000, 0])
    draws = np.stack([np.asarray(f(jax.random.key(i), n)) for i in range(2000)])
    assert np.all(draws[:, 0] == 0) and np.all(draws[:, 4] == 0)
    assert np.all((draws[:, 1:4] >= 0) & (draws[:, 1:4] < np.asarray([7, 7, 1000])))
    counts = np.bincount(draws[:, 1:3].ravel(), minlength=7)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_uniform_index_takes_first_accepted_draw():
    """Same draws as the function, resolved in numpy: the first draw below the largest
    multiple of n, else the last one. n = 2^31 + 1 rejects almost half of all draws, so
    every position (and the all-rejected fallback) occurs."""
    n = np.array([2**31 + 1] * 4096 + [7, 1000, 3], np.uint32)
    key = jax.random.key(5)
    got = np.asarray(jax.jit(uniform_index)(key, jnp.asarray(n))).astype(np.int64) & 0xFFFFFFFF
    u = np.asarray(jax.random.bits(key, (clicks.REJECTION_ROUNDS, n.size), jnp.uint32))
    u = u.astype(np.int64)
    limit = 2**32 - 1 - (2**32 % n.astype(np.int64))
    accepted = u <= limit
    first = np.where(accepted.any(0), accepted.argmax(0), clicks.REJECTION_ROUNDS - 1)
    np.testing.assert_array_equal(got, u[first, np.arange(n.size)] % n)
    assert set(np.unique(first[:4096])) == set(range(clicks.REJECTION_ROUNDS))
    assert 0 < (~accepted[:, :4096].any(0)).sum() < 4096 / 8  # the fallback, ~1/16 of them
    assert np.all(got < n)
    assert abs(got[:4096].mean() / (2**31 + 1) - 0.5) < 0.02


def test_click_sampling_has_no_loop():
    """No data-dependent loop: on a GPU its predicate would be read on the host."""
    logits = jnp.zeros((2, 8, 8, 8))
    gt = jnp.ones((2, 8, 8, 8), jnp.uint8)
    jaxpr = str(jax.make_jaxpr(sample_clicks)(jax.random.key(0), logits, gt))
    assert "random_bits" in jaxpr  # (the generator's rounds are a fixed loop inside it)
    assert "while" not in jaxpr and "cond" not in jaxpr
