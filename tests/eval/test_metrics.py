"""Tests of sammed3d_jax.eval.metrics: hand-computed cases and brute-force cross-checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sammed3d_jax.eval import metrics as M

SQ2 = math.sqrt(2.0)
SQ3 = math.sqrt(3.0)


def cube(shape, lo, size) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, a + size) for a in lo)] = True
    return m


def code_of(inside) -> int:
    """Neighbour code of a 2×2×2 window given its set of foreground offsets (a, b, c)."""
    return sum(1 << (7 - (4 * a + 2 * b + c)) for a, b, c in inside)


def cube_symmetries():
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            yield perm, flips


def transform(inside, perm, flips):
    out = []
    for corner in inside:
        c = [corner[perm[i]] for i in range(3)]
        out.append(tuple(1 - v if f else v for v, f in zip(c, flips)))
    return out


# ---------------------------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------------------------


def test_dice_edge_cases():
    shape = (6, 6, 6)
    g = cube(shape, (1, 1, 1), 3)
    empty = np.zeros(shape, dtype=bool)
    assert M.dice(empty, g) == 0.0
    assert M.dice(g, empty) == 0.0
    assert math.isnan(M.dice(empty, empty))
    assert M.dice(g, g) == 1.0


@pytest.mark.parametrize("k", [2, 3, 5])
def test_dice_shifted_cube(k):
    shape = (k + 3,) * 3
    g = cube(shape, (1, 1, 1), k)
    p = cube(shape, (2, 1, 1), k)
    assert M.dice(p, g) == pytest.approx((k - 1) / k, abs=1e-15)


def test_dice_accepts_integer_labels():
    g = np.array([0, 3, 3, 0])
    p = np.array([1, 1, 0, 0])
    assert M.dice(p, g) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Surfel-area table
# ---------------------------------------------------------------------------------------------


def test_surfel_table_known_configurations():
    table = M.surfel_area_table((1.0, 1.0, 1.0))
    assert table[0] == 0.0 and table[255] == 0.0
    corners = list(itertools.product((0, 1), repeat=3))
    for corner in corners:  # one corner cut off: equilateral triangle of side sqrt(2)/2
        assert table[code_of([corner])] == pytest.approx(SQ3 / 8)
    # two corners sharing an edge: rectangle 1 × sqrt(2)/2
    assert table[code_of([(0, 0, 0), (0, 0, 1)])] == pytest.approx(SQ2 / 2)
    # a full face: unit square
    assert table[code_of([(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)])] == pytest.approx(1.0)
    # diagonal corners on a face / through the body: two separate triangles
    assert table[code_of([(0, 0, 0), (0, 1, 1)])] == pytest.approx(SQ3 / 4)
    assert table[code_of([(0, 0, 0), (1, 1, 1)])] == pytest.approx(SQ3 / 4)
    # L-shaped triple: pentagon split into triangles of areas 1/2, sqrt(3)/4, sqrt(3)/8
    assert table[code_of([(0, 0, 0), (0, 0, 1), (0, 1, 0)])] == pytest.approx(
        0.5 + SQ3 / 4 + SQ3 / 8
    )
    # corner plus its three neighbours: planar regular hexagon of side sqrt(2)/2
    star = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    assert table[code_of(star)] == pytest.approx(3 * SQ3 / 4)
    # three-edge path in three directions: skew hexagon, maximal-area triangulation
    helix = [(0, 0, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert table[code_of(helix)] == pytest.approx((SQ3 + SQ2) / 2)
    # four alternate corners: four triangles
    tetra = [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)]
    assert table[code_of(tetra)] == pytest.approx(SQ3 / 2)


def test_surfel_table_symmetries():
    table = M.surfel_area_table((1.0, 1.0, 1.0))
    corners = list(itertools.product((0, 1), repeat=3))
    for code in range(256):
        inside = [c for c in corners if code >> (7 - (4 * c[0] + 2 * c[1] + c[2])) & 1]
        assert code_of(inside) == code
        assert table[255 - code] == pytest.approx(table[code], abs=1e-12)
        for perm, flips in cube_symmetries():
            assert table[code_of(transform(inside, perm, flips))] == pytest.approx(
                table[code], abs=1e-12
            )


def test_surfel_table_anisotropic_faces():
    table = M.surfel_area_table((2.0, 3.0, 5.0))
    face_normal_0 = code_of([(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)])
    face_normal_1 = code_of([(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)])
    face_normal_2 = code_of([(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)])
    assert table[face_normal_0] == pytest.approx(15.0)
    assert table[face_normal_1] == pytest.approx(10.0)
    assert table[face_normal_2] == pytest.approx(6.0)
    # permuting the spacing permutes the table accordingly
    perm = (2, 0, 1)
    table_p = M.surfel_area_table(tuple((2.0, 3.0, 5.0)[perm[i]] for i in range(3)))
    corners = list(itertools.product((0, 1), repeat=3))
    for code in range(256):
        inside = [c for c in corners if code >> (7 - (4 * c[0] + 2 * c[1] + c[2])) & 1]
        moved = [tuple(c[perm[i]] for i in range(3)) for c in inside]
        assert table_p[code_of(moved)] == pytest.approx(table[code], abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_total_surface_area_of_cube(k):
    g = cube((k + 4,) * 3, (2, 2, 2), k)
    sd = M.surface_distances(g, g, (1.0, 1.0, 1.0))
    expected = 6 * (k - 1) ** 2 + 6 * SQ2 * (k - 1) + SQ3
    assert sd.surfel_areas_gt.sum() == pytest.approx(expected)
    assert sd.surfel_areas_pred.sum() == pytest.approx(expected)
    assert np.all(sd.distances_gt_to_pred == 0.0)


# ---------------------------------------------------------------------------------------------
# NSD: hand-computed cases
# ---------------------------------------------------------------------------------------------


def test_nsd_edge_cases():
    shape = (6, 6, 6)
    g = cube(shape, (1, 1, 1), 3)
    empty = np.zeros(shape, dtype=bool)
    assert M.nsd(g, g, (1, 1, 1), 1.0) == 1.0
    assert M.nsd(empty, g, (1, 1, 1), 1.0) == 0.0
    assert M.nsd(g, empty, (1, 1, 1), 1.0) == 0.0
    assert math.isnan(M.nsd(empty, empty, (1, 1, 1), 1.0))
    sd = M.surface_distances(empty, g, (1, 1, 1))
    assert sd.distances_pred_to_gt.size == 0
    assert np.all(np.isinf(sd.distances_gt_to_pred))
    sd = M.surface_distances(empty, empty, (1, 1, 1))
    assert all(a.size == 0 for a in sd)


@pytest.mark.parametrize("k", [3, 4, 6])
def test_nsd_cube_shifted_one_voxel(k):
    # Label [1, 1+k)³, prediction shifted by one voxel along axis 0. On the corner grid the
    # label surface is the boundary of the box [0, k]³ (relative to the label's first voxel)
    # and the prediction's is [1, k+1] × [0, k]². Label surfels at distance 0: the four side
    # faces (interior points, area 1) with x in [1, k-1], the 8 edges that lie on side faces
    # with x >= 1 (area sqrt(2)/2), the 4 corners with x = k (area sqrt(3)/8); every other
    # surfel is at distance exactly 1. The prediction is the mirror image.
    shape = (k + 4,) * 3
    g = cube(shape, (1, 1, 1), k)
    p = cube(shape, (2, 1, 1), k)
    total = 6 * (k - 1) ** 2 + 6 * SQ2 * (k - 1) + SQ3
    at_zero = 4 * (k - 1) ** 2 + 8 * (k - 1) * SQ2 / 2 + 4 * SQ3 / 8
    for method in ("edt", "kdtree"):
        assert M.nsd(p, g, (1, 1, 1), 0.9, method=method) == pytest.approx(at_zero / total)
        assert M.nsd(p, g, (1, 1, 1), 1.1, method=method) == pytest.approx(1.0)
        assert M.nsd(p, g, (1, 1, 1), 1.0, method=method) == pytest.approx(1.0)  # <= tolerance


@pytest.mark.parametrize("k", [4, 6])
def test_nsd_anisotropic_spacing(k):
    # Spacing (2, 1, 1): a one-voxel shift along axis 0 is 2 mm, along axis 1 only 1 mm.
    shape = (k + 4,) * 3
    spacing = (2.0, 1.0, 1.0)
    g = cube(shape, (1, 1, 1), k)
    shifted_1 = cube(shape, (1, 2, 1), k)
    assert M.nsd(shifted_1, g, spacing, 1.5) == pytest.approx(1.0)

    shifted_0 = cube(shape, (2, 1, 1), k)
    # Surfel areas at spacing (2,1,1): faces normal to axis 0 → 1, to axes 1/2 → 2; edges
    # parallel to axis 0 → sqrt(2), to axes 1/2 → sqrt(5)/2; corners → 3/8.
    total = 10 * (k - 1) ** 2 + (k - 1) * (4 * SQ2 + 4 * math.sqrt(5)) + 3
    # Label surfels farther than 1.5 mm from the shifted surface: the whole x = 0 face
    # (interior, its 4 edges, 4 corners: all at 2 mm) and the x = k face interior points at
    # least 2 voxels from its rim (min(2 mm, in-plane distance to the rim) = 2 mm).
    far = (k - 1) ** 2 + 2 * math.sqrt(5) * (k - 1) + 4 * 3 / 8 + (k - 3) ** 2
    for method in ("edt", "kdtree"):
        value = M.nsd(shifted_0, g, spacing, 1.5, method=method)
        assert value == pytest.approx(1.0 - far / total)
        assert M.nsd(shifted_0, g, spacing, 2.0, method=method) == pytest.approx(1.0)
    assert M.nsd(shifted_0, g, (1.0, 1.0, 1.0), 1.5) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Brute-force cross-check
# ---------------------------------------------------------------------------------------------


def brute_force_surfels(mask: np.ndarray, spacing):
    """Corner-grid surfel positions and areas by explicit loops over 2×2×2 windows."""
    table = M.surfel_area_table(spacing)
    padded = np.pad(mask.astype(bool), 1)
    points, areas = [], []
    for i in range(mask.shape[0] + 1):
        for j in range(mask.shape[1] + 1):
            for k in range(mask.shape[2] + 1):
                window = padded[i : i + 2, j : j + 2, k : k + 2]
                code = 0
                for a, b, c in itertools.product((0, 1), repeat=3):
                    if window[a, b, c]:
                        code |= 1 << (7 - (4 * a + 2 * b + c))
                if code not in (0, 255):
                    points.append((i, j, k))
                    areas.append(table[code])
    return np.array(points, dtype=float).reshape(-1, 3), np.array(areas)


def brute_force_nsd(p, g, spacing, tol):
    sp = np.asarray(spacing, dtype=float)
    pts_g, area_g = brute_force_surfels(g, spacing)
    pts_p, area_p = brute_force_surfels(p, spacing)
    if len(pts_g) == 0 and len(pts_p) == 0:
        return float("nan"), None, None
    if len(pts_g) == 0 or len(pts_p) == 0:
        return 0.0, None, None
    diff = (pts_g[:, None, :] - pts_p[None, :, :]) * sp
    dist = np.sqrt((diff**2).sum(-1))
    d_gp = dist.min(axis=1)
    d_pg = dist.min(axis=0)
    value = (area_g[d_gp <= tol].sum() + area_p[d_pg <= tol].sum()) / (area_g.sum() + area_p.sum())
    return value, np.sort(d_gp), np.sort(d_pg)


masks_3d = st.tuples(
    st.integers(2, 7), st.integers(2, 7), st.integers(2, 7), st.integers(0, 2**32 - 1)
)


@settings(max_examples=40, deadline=None)
@given(
    masks_3d,
    st.floats(0.05, 0.6),
    st.floats(0.0, 0.4),
    st.sampled_from([(1.0, 1.0, 1.0), (0.7, 1.3, 2.0), (3.0, 0.5, 0.9)]),
    st.sampled_from([0.5, 1.0, 2.0, 3.0]),
)
def test_nsd_matches_brute_force(dims, density, noise, spacing, tol):
    *shape, seed = dims
    rng = np.random.default_rng(seed)
    g = rng.random(shape) < density
    p = g ^ (rng.random(shape) < noise)
    expected, d_gp, d_pg = brute_force_nsd(p, g, spacing, tol)
    for method in ("edt", "kdtree"):
        got = M.nsd(p, g, spacing, tol, method=method)
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, abs=1e-12)
        if d_gp is not None:
            sd = M.surface_distances(p, g, spacing, method=method)
            np.testing.assert_allclose(sd.distances_gt_to_pred, d_gp, atol=1e-12)
            np.testing.assert_allclose(sd.distances_pred_to_gt, d_pg, atol=1e-12)


def test_kdtree_and_edt_agree_on_larger_volumes():
    rng = np.random.default_rng(7)
    z, y, x = np.ogrid[:60, :70, :40]
    g = ((z - 30) / 20.0) ** 2 + ((y - 35) / 25.0) ** 2 + ((x - 20) / 12.0) ** 2 < 1
    p = ((z - 31) / 21.0) ** 2 + ((y - 34) / 23.0) ** 2 + ((x - 20) / 13.0) ** 2 < 1
    p ^= rng.random(p.shape) < 0.002
    spacing = (0.8, 0.8, 2.5)
    a = M.surface_distances(p, g, spacing, method="edt")
    b = M.surface_distances(p, g, spacing, method="kdtree")
    # Equidistant nearest surfels reached through different offsets may differ in the last
    # bit of the distance; everything else is identical.
    for d_a, w_a, d_b, w_b in (
        (a.distances_gt_to_pred, a.surfel_areas_gt, b.distances_gt_to_pred, b.surfel_areas_gt),
        (a.distances_pred_to_gt, a.surfel_areas_pred, b.distances_pred_to_gt, b.surfel_areas_pred),
    ):
        np.testing.assert_allclose(d_a, d_b, rtol=1e-15, atol=0)
        order_a = np.lexsort((w_a, np.round(d_a, 9)))
        order_b = np.lexsort((w_b, np.round(d_b, 9)))
        np.testing.assert_array_equal(w_a[order_a], w_b[order_b])
    for tol in (0.5, 1.0, 2.0):
        assert M.nsd(p, g, spacing, tol, method="kdtree") == pytest.approx(
            M.nsd_from_distances(a, tol), abs=1e-15
        )


def test_crop_position_invariance():
    rng = np.random.default_rng(3)
    g = rng.random((5, 6, 4)) < 0.5
    p = rng.random((5, 6, 4)) < 0.5
    big_g = np.zeros((20, 20, 20), dtype=bool)
    big_p = np.zeros((20, 20, 20), dtype=bool)
    big_g[7:12, 3:9, 10:14] = g
    big_p[7:12, 3:9, 10:14] = p
    small = M.nsd(p, g, (1.0, 2.0, 0.5), 1.0)
    assert M.nsd(big_p, big_g, (1.0, 2.0, 0.5), 1.0) == pytest.approx(small, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Multi-class and challenge aggregates
# ---------------------------------------------------------------------------------------------


def test_per_class_metrics():
    shape = (10, 10, 10)
    gt = np.zeros(shape, dtype=np.uint8)
    gt[cube(shape, (1, 1, 1), 4)] = 1
    gt[cube(shape, (5, 5, 5), 3)] = 3
    pred = np.zeros_like(gt)
    pred[cube(shape, (2, 1, 1), 4)] = 1
    pred[cube(shape, (0, 7, 0), 2)] = 2  # class absent from the label
    res = M.per_class_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert list(res) == [1, 3]
    assert res[1]["dsc"] == pytest.approx(0.75)
    assert res[1]["nsd"] == pytest.approx(1.0)  # one-voxel shift, 1 mm tolerance
    assert res[3] == {"dsc": 0.0, "nsd": 0.0}
    res = M.per_class_metrics(pred, gt, (1, 1, 1), classes=[2, 4], metrics=["dice"])
    assert res[2] == {"dsc": 0.0}
    assert math.isnan(res[4]["dsc"])


def test_cvpr25_step_metrics_threshold_rule():
    shape = (12, 12, 12)
    gt = np.zeros(shape, dtype=np.uint8)
    gt[cube(shape, (1, 1, 1), 4)] = 1
    gt[cube(shape, (6, 6, 6), 4)] = 2
    pred = gt.copy()
    dsc, value = M.cvpr25_step_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert (dsc, value) == (1.0, 1.0)

    # class 1 shifted by two voxels (2 mm: still within the 2 mm tolerance), class 2 missing
    pred = np.zeros_like(gt)
    pred[cube(shape, (3, 1, 1), 4)] = 1
    dsc, value = M.cvpr25_step_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert dsc == pytest.approx((0.5 + 0.0) / 2)
    assert value == pytest.approx((1.0 + 0.0) / 2)
    _, value_1mm = M.cvpr25_step_metrics(pred, gt, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert value_1mm < value

    # mean DSC 0.125 <= 0.2 → NSD is not computed and reported as 0
    pred = np.zeros_like(gt)
    pred[cube(shape, (4, 1, 1), 4)] = 1
    dsc, value = M.cvpr25_step_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert dsc == pytest.approx(0.125)
    assert value == 0.0
    # exactly at the threshold is not enough
    dsc, value = M.cvpr25_step_metrics(pred, gt, (1.0, 1.0, 1.0), dsc_threshold=0.125)
    assert value == 0.0
    dsc, value = M.cvpr25_step_metrics(pred, gt, (1.0, 1.0, 1.0), dsc_threshold=0.1)
    assert value > 0.0
    dsc, value = M.cvpr25_step_metrics(pred, np.zeros_like(gt), (1.0, 1.0, 1.0))
    assert math.isnan(dsc) and value == 0.0


def test_cvpr25_auc_and_summary():
    dscs = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5]  # box step, then five clicks
    # trapezoid over the five click values with unit spacing: (0.1+0.5)/2 + 0.2+0.3+0.4
    assert M.cvpr25_auc(dscs) == pytest.approx(1.2)
    assert M.cvpr25_auc([1.0] * 6) == pytest.approx(4.0)
    assert M.cvpr25_auc([0.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    nsds = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    summary = M.cvpr25_summary(dscs, nsds)
    assert summary == pytest.approx(
        {"dsc_auc": 1.2, "nsd_auc": 0.25 + 0.5 + 0.75 + 1.0, "dsc_final": 0.5, "nsd_final": 1.0}
    )
    with pytest.raises(ValueError):
        M.cvpr25_auc([0.3])
    with pytest.raises(ValueError):
        M.cvpr25_summary([0.1, 0.2], [0.1])
