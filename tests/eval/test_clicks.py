"""Tests of sammed3d_jax.eval.clicks: reference picks, error-region properties, brute force."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sammed3d_jax.eval import clicks as C


def random_pair(seed: int, shape, mode: int):
    """A label and a previous prediction with various error patterns."""
    rng = np.random.default_rng(seed)
    gt = rng.random(shape) < rng.uniform(0.05, 0.6)
    if mode == 0:
        prev = np.zeros(shape, dtype=bool)
    elif mode == 1:
        prev = gt ^ (rng.random(shape) < 0.15)
    elif mode == 2:
        prev = gt.copy()
    else:
        prev = rng.random(shape) < 0.3
    return prev, gt


pairs = st.tuples(
    st.integers(0, 2**32 - 1),
    st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    st.integers(0, 3),
)


def errors(prev, gt):
    p = prev > 0
    g = gt > 0
    return g & ~p, p & ~g


# ---------------------------------------------------------------------------------------------
# Brute-force references
# ---------------------------------------------------------------------------------------------


def brute_components_26(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """26-connected components by breadth-first search, in order of their first voxel (C
    order)."""
    seen = np.zeros(mask.shape, dtype=bool)
    comps = []
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)]
    for start in map(tuple, np.argwhere(mask)):
        if seen[start]:
            continue
        seen[start] = True
        comp, queue = [], deque([start])
        while queue:
            v = queue.popleft()
            comp.append(v)
            for o in offsets:
                w = tuple(a + b for a, b in zip(v, o))
                if all(0 <= w[i] < mask.shape[i] for i in range(3)) and mask[w] and not seen[w]:
                    seen[w] = True
                    queue.append(w)
        comps.append(comp)
    return comps


def brute_edt_black_border(mask: np.ndarray) -> np.ndarray:
    """Unit-spacing distance of each voxel to the nearest background voxel, with the whole
    outside of the array counted as background."""
    padded = np.pad(mask, 1)
    background = np.argwhere(~padded).astype(float)
    out = np.zeros(mask.shape)
    for v in np.argwhere(mask):
        out[tuple(v)] = np.sqrt(((background - (v + 1)) ** 2).sum(1)).min()
    return out


# ---------------------------------------------------------------------------------------------
# SAM-Med3D inference rule
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_sammed3d_click_matches_reference_pick(pair):
    seed, shape, mode = pair
    prev, gt = random_pair(seed, shape, mode)
    if not gt.any():
        with pytest.raises(ValueError):
            C.sammed3d_click(prev, gt, np.random.RandomState(233))
        return
    fn, fp = errors(prev, gt)
    err = fn | fp
    rs = np.random.RandomState(233)
    point, label = C.sammed3d_click(prev.astype(np.uint8), gt.astype(np.uint8), rs)
    ref_rs = np.random.RandomState(233)
    if err.any():
        expected = np.argwhere(err)[ref_rs.randint(len(np.argwhere(err)))]
        assert err[tuple(point)]
        assert label == int(fn[tuple(point)])
        assert (label == 1) == bool(fn[tuple(point)])
        assert (label == 0) == bool(fp[tuple(point)])
    else:
        expected = np.argwhere(gt)[ref_rs.randint(len(np.argwhere(gt)))]
        assert label == 1
    np.testing.assert_array_equal(point, expected)
    assert point.dtype == np.int64 and point.shape == (3,)
    # exactly one draw was consumed
    assert rs.randint(1 << 30) == ref_rs.randint(1 << 30)


def test_sammed3d_click_sequence_and_threshold():
    rng = np.random.default_rng(0)
    gt = rng.random((16, 16, 16)) < 0.2
    logits = rng.normal(size=gt.shape)
    rs = np.random.RandomState(233)
    ref = np.random.RandomState(233)
    for _ in range(4):
        point, label = C.sammed3d_click(logits, gt, rs, threshold=0.5)
        pred = logits > 0.5
        err = (gt & ~pred) | (~gt & pred)
        np.testing.assert_array_equal(point, np.argwhere(err)[ref.randint(err.sum())])
        assert label == int(gt[tuple(point)])


# ---------------------------------------------------------------------------------------------
# Historical EDT ("ritm") rule
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_ritm_click_matches_brute_force(pair):
    seed, shape, mode = pair
    prev, gt = random_pair(seed, shape, mode)
    fn, fp = errors(prev, gt)
    if not (fn | fp).any():
        point, label = C.ritm_click(prev, gt, np.random.RandomState(0))
        np.testing.assert_array_equal(point, np.array(shape) // 2)
        assert label == 0
        with pytest.raises(ValueError):
            C.ritm_click(prev, gt, np.random.RandomState(0), on_empty="raise")
        return
    d_fn = brute_edt_black_border(fn)
    d_fp = brute_edt_black_border(fp)
    top = max(d_fn.max(), d_fp.max())
    chosen = d_fn if d_fn.max() > d_fp.max() else d_fp
    candidates = np.argwhere(chosen > top / 2)
    ref_rs = np.random.RandomState(seed % 1000)
    expected = candidates[ref_rs.randint(len(candidates))]
    rs = np.random.RandomState(seed % 1000)
    point, label = C.ritm_click(prev.astype(np.float32), gt, rs)
    np.testing.assert_array_equal(point, expected)
    assert (fn | fp)[tuple(point)]
    assert label == int(fn[tuple(point)])
    assert chosen[tuple(point)] > top / 2
    assert rs.randint(1 << 30) == ref_rs.randint(1 << 30)


def test_ritm_first_click_is_deep_inside_target():
    gt = np.zeros((20, 20, 20), dtype=bool)
    gt[4:15, 4:15, 4:15] = True  # distances 1..6 inside, max 6 at the centre
    prev = np.zeros_like(gt)
    for seed in range(10):
        point, label = C.ritm_click(prev, gt, np.random.RandomState(seed))
        assert label == 1
        assert np.all(point >= 7) and np.all(point <= 11)  # distance > 3


def test_ritm_prefers_fp_on_equal_maxima():
    gt = np.zeros((9, 9, 9), dtype=bool)
    gt[1, 1, 1] = True
    prev = np.zeros_like(gt)
    prev[7, 7, 7] = True  # FN and FP both single voxels with distance 1
    point, label = C.ritm_click(prev, gt, np.random.RandomState(0))
    np.testing.assert_array_equal(point, [7, 7, 7])
    assert label == 0


# ---------------------------------------------------------------------------------------------
# CVPR 2025 challenge rule
# ---------------------------------------------------------------------------------------------


def test_cvpr25_click_perfect_prediction_is_none():
    gt = np.zeros((5, 5, 5), dtype=np.uint8)
    gt[1:3, 1:4, 2] = 1
    assert C.cvpr25_click(gt.copy(), gt) is None
    assert C.cvpr25_click(np.zeros_like(gt), np.zeros_like(gt)) is None


def test_cvpr25_click_hand_cases():
    shape = (11, 11, 11)
    gt = np.zeros(shape, dtype=np.uint8)
    gt[2:7, 2:7, 2:7] = 1  # 5³ cube → unique deepest voxel (4, 4, 4), distance 3
    prev = np.zeros_like(gt)
    point, label = C.cvpr25_click(prev, gt)
    np.testing.assert_array_equal(point, [4, 4, 4])
    assert label == 1

    # over-segmentation far from the target is the larger error → background click
    prev = gt.copy()
    prev[8:11, 0:3, 0:11] = 1  # 99-voxel FP block touching the image border
    point, label = C.cvpr25_click(prev, gt)
    assert label == 0
    assert prev[tuple(point)] == 1 and gt[tuple(point)] == 0
    # the border counts as background: distance 2 only at the block's middle row/column
    assert point[0] == 9 and point[1] == 1

    # single-voxel error
    prev = gt.copy()
    prev[4, 4, 4] = 0
    point, label = C.cvpr25_click(prev, gt)
    np.testing.assert_array_equal(point, [4, 4, 4])
    assert label == 1


def test_cvpr25_click_tie_break_uses_seed_42():
    gt = np.zeros((4, 4, 12), dtype=np.uint8)
    gt[1:3, 1:3, 1:11] = 1  # 2×2×10 bar: 40 voxels, 32 of them at the maximal distance
    point, label = C.cvpr25_click(np.zeros_like(gt), gt)
    d = brute_edt_black_border(gt.astype(bool))
    ties = np.argwhere(d == d.max())
    assert len(ties) > 1
    expected = ties[np.random.RandomState(42).choice(len(ties))]
    np.testing.assert_array_equal(point, expected)
    assert label == 1
    # the global NumPy generator is left alone
    before = np.random.get_state()  # noqa: NPY002
    C.cvpr25_click(np.zeros_like(gt), gt)
    after = np.random.get_state()  # noqa: NPY002
    np.testing.assert_array_equal(after[1], before[1])
    assert after[2] == before[2]


def test_cvpr25_click_ignores_voxel_spacing_and_uses_26_connectivity():
    gt = np.zeros((8, 8, 8), dtype=np.uint8)
    # two diagonal-touching 2³ blocks form one 26-connected FN component of 16 voxels,
    # larger than a separate 3×3×1 FN plate (9 voxels)
    gt[1:3, 1:3, 1:3] = 1
    gt[3:5, 3:5, 3:5] = 1
    gt[6:8, 0:3, 5:8] = 0
    gt[7, 0:3, 5:8] = 1
    comp = C.largest_error_component(np.zeros_like(gt), gt)
    assert comp.sum() == 16
    point, _ = C.cvpr25_click(np.zeros_like(gt), gt)
    assert comp[tuple(point)]


def test_cvpr25_component_size_tie_goes_to_first_in_c_order():
    gt = np.zeros((6, 6, 12), dtype=np.uint8)
    gt[3:5, 1:3, 1:3] = 1  # first voxel (3, 1, 1)
    gt[1:3, 3:5, 8:10] = 1  # same size, first voxel (1, 3, 8): earlier in C order
    comp = C.largest_error_component(np.zeros_like(gt), gt)
    assert comp[1, 3, 8] and not comp[3, 1, 1]


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_cvpr25_click_properties(pair):
    seed, shape, mode = pair
    prev, gt = random_pair(seed, shape, mode)
    fn, fp = errors(prev, gt)
    err = fn | fp
    result = C.cvpr25_click(prev.astype(np.uint8), gt.astype(np.uint8))
    if not err.any():
        assert result is None
        return
    point, label = result
    comps = brute_components_26(err)
    sizes = [len(c) for c in comps]
    largest = comps[int(np.argmax(sizes))]  # first of the largest, in C order of first voxel
    comp = np.zeros(shape, dtype=bool)
    comp[tuple(np.array(largest).T)] = True
    assert comp[tuple(point)]
    d = brute_edt_black_border(comp)
    assert d[tuple(point)] == pytest.approx(d.max())
    ties = np.argwhere(np.isclose(d, d.max()))
    np.testing.assert_array_equal(point, ties[np.random.RandomState(42).choice(len(ties))])
    assert label == int(gt[tuple(point)])
    assert (label == 1) == bool(fn[tuple(point)])
    assert (label == 0) == bool(fp[tuple(point)])


def test_cvpr25_downsampled_distance_path(monkeypatch):
    # Very large components are transformed at half resolution (max-pooled 2×2×2).
    gt = np.zeros((12, 12, 12), dtype=np.uint8)
    gt[1:10, 2:11, 1:8] = 1
    monkeypatch.setattr(C, "CVPR25_EDT_DOWNSAMPLE_VOXELS", 100)
    point, label = C.cvpr25_click(np.zeros_like(gt), gt)
    assert label == 1 and gt[tuple(point)] == 1
    comp = gt.astype(bool)
    dist, window = C._component_edt(comp)
    padded = np.pad(comp[window], [(2, 2), (2, 2), (1, 1)])
    padded = np.pad(padded, [(0, s % 2) for s in padded.shape])
    coarse = padded.reshape(
        padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2
    ).max(axis=(1, 3, 5))
    zeros = np.argwhere(~coarse).astype(float)
    coarse_dist = np.zeros(coarse.shape)
    for v in np.argwhere(coarse):
        coarse_dist[tuple(v)] = np.sqrt(((zeros - v) ** 2).sum(1)).min()
    fine = coarse_dist.repeat(2, 0).repeat(2, 1).repeat(2, 2)[2:11, 2:11, 1:8]
    np.testing.assert_allclose(dist, fine * comp[window])


def test_click_input_validation():
    with pytest.raises(ValueError):
        C.cvpr25_click(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        C.sammed3d_click(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), np.random.RandomState(0))
