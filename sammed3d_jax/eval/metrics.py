"""Segmentation metrics: Dice, surfel-weighted surface distances, normalised surface Dice (NSD)
and the aggregates of the CVPR 2025 interactive 3D segmentation challenge.

All functions work on NumPy arrays; masks are 3-D ``(A0, A1, A2)`` arrays where any non-zero
value is foreground, and ``spacing`` gives the voxel size in millimetres along those same
three array axes.

Dice (``dice``)
    ``2|P∧G| / (|P|+|G|)``; NaN when both masks are empty, 0 when only one is empty (the
    nnU-Net / SAM-Med3D convention).

Surface distances (``surface_distances``, ``nsd``)
    The surfel formulation of the normalised surface Dice:

    1. Both masks are cropped to the bounding box of their union and zero-padded by one voxel.
    2. Each point of the corner grid (between voxels) gets the 8-bit code of the 2×2×2 voxel
       neighbourhood around it: the voxel at offset ``(a, b, c) ∈ {0,1}³`` from the window's
       low corner contributes bit ``7 - (4a + 2b + c)`` (so the window's low corner is the
       most significant bit). Codes other than 0 and 255 mark surface elements ("surfels").
    3. Each code has a surface area: the marching-cubes surface of the 2×2×2 cube with
       vertices at edge midpoints, where on an ambiguous face the corners of the minority
       phase (inside when at most four corners are inside, outside otherwise) are cut off
       separately; every resulting polygon is split into the triangulation of maximal area,
       and each triangle's area vector ``(n0, n1, n2)`` is scaled to
       ``(n0·s1·s2, n1·s0·s2, n2·s0·s1)`` for spacing ``(s0, s1, s2)``. This is the standard
       256-entry surfel-area table behind the NSD of SAM-Med3D and of the challenge below,
       for every spacing (to floating-point rounding).
    4. The distance of every surfel of one mask to the nearest surfel of the other is the
       Euclidean distance on the corner grid with ``sampling=spacing`` — computed with
       ``scipy.ndimage.distance_transform_edt`` on the crop (``method="edt"``), or, for large
       crops, with an exact nearest-neighbour search over surfel positions
       (``method="kdtree"``) whose distances are evaluated with the same floating-point
       formula as scipy's transform (where two nearest surfels are equally far through
       different offsets, the two methods may differ in the last bit).
    5. ``NSD(τ) = (Σ area_G[d_G→P ≤ τ] + Σ area_P[d_P→G ≤ τ]) / (Σ area_G + Σ area_P)``.

    Edge cases follow SAM-Med3D's ``compute_metrics``: NaN when both masks are empty, 0 when
    exactly one is empty.

SAM-Med3D evaluation (``per_class_metrics``)
    Classes are the sorted non-zero label values of the ground truth (unless given); per class
    DSC and NSD at a tolerance of 1 mm in the original spacing.

CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation"
    - per interaction step, the image-level DSC is the mean over the ground-truth classes
      (sorted non-zero values of the label map) of the per-class Dice;
    - the image-level NSD is the mean over the same classes of the per-class NSD at a
      tolerance of **2 mm** in the image spacing, and it is only computed when the
      image-level DSC is strictly greater than 0.2; otherwise the step's NSD is 0.0;
    - a case has six steps (bounding box, then five clicks; a case without a box prompt
      records 0 for the first step); ``DSC_AUC`` / ``NSD_AUC`` are the trapezoidal areas
      under the last five values (the five click steps, the box step excluded) against the
      abscissae ``0, 1, 2, 3, 4`` — i.e. ``cumulative_trapezoid(v[-5:], arange(5))[-1]``, a
      number in ``[0, 4]``;
    - ``DSC_Final`` / ``NSD_Final`` are the values of the last step.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
from scipy import integrate, ndimage
from scipy.spatial import cKDTree

__all__ = [
    "CVPR25_NSD_DSC_THRESHOLD",
    "CVPR25_NSD_TOLERANCE_MM",
    "CVPR25_NUM_CLICKS",
    "SAMMED3D_NSD_TOLERANCE_MM",
    "SurfaceDistances",
    "bounding_box",
    "cvpr25_auc",
    "cvpr25_step_metrics",
    "cvpr25_summary",
    "dice",
    "nsd",
    "nsd_from_distances",
    "per_class_metrics",
    "surface_distances",
    "surfel_area_table",
]

#: NSD tolerance (mm) of SAM-Med3D's own evaluation (`compute_metrics`).
SAMMED3D_NSD_TOLERANCE_MM = 1.0
#: NSD tolerance (mm) of the CVPR 2025 interactive segmentation challenge.
CVPR25_NSD_TOLERANCE_MM = 2.0
#: The challenge only computes NSD for a step whose image-level DSC exceeds this value.
CVPR25_NSD_DSC_THRESHOLD = 0.2
#: Number of click steps the challenge integrates over.
CVPR25_NUM_CLICKS = 5

# Crops with more corner-grid points than this use the nearest-neighbour search by default.
_AUTO_KDTREE_VOXELS = 1 << 20


# ---------------------------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------------------------


def dice(y_pred: np.ndarray, y: np.ndarray) -> float:
    """Dice coefficient of two binary masks of the same shape (any number of dimensions).

    Args:
        y_pred: prediction, any shape; non-zero = foreground.
        y: ground truth, same shape as ``y_pred``.

    Returns:
        ``2|P∧G| / (|P|+|G|)``; NaN when both are empty; 0.0 when exactly one is empty.
    """
    p = np.asarray(y_pred) != 0
    g = np.asarray(y) != 0
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs label {g.shape}")
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return float("nan")
    inter = int(np.count_nonzero(p & g))
    return 2.0 * inter / total


# ---------------------------------------------------------------------------------------------
# Surfel-area table
# ---------------------------------------------------------------------------------------------

_CORNERS: tuple[tuple[int, int, int], ...] = tuple(itertools.product((0, 1), repeat=3))


def _corner_bit(corner: tuple[int, int, int]) -> int:
    a, b, c = corner
    return 7 - (4 * a + 2 * b + c)


def _face_cycles() -> list[list[tuple[int, int, int]]]:
    """The six faces of the unit cube, each as its four corners in cyclic order."""
    faces = []
    for axis in range(3):
        u, v = (ax for ax in range(3) if ax != axis)
        for value in (0, 1):
            cycle = []
            for s, t in ((0, 0), (0, 1), (1, 1), (1, 0)):
                corner = [0, 0, 0]
                corner[axis], corner[u], corner[v] = value, s, t
                cycle.append(tuple(corner))
            faces.append(cycle)
    return faces


def _surface_polygons(inside: frozenset) -> list[list[tuple[int, int, int]]]:
    """Closed polygons of the marching-cubes surface of one cube.

    Vertices are edge midpoints in doubled integer coordinates (0, 1 or 2 per axis). On a face
    with two diagonal inside corners each inside corner is cut off separately.
    """
    segments: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for cycle in _face_cycles():
        flags = [corner in inside for corner in cycle]

        def midpoint(i: int, cycle=cycle) -> tuple[int, ...]:
            p, q = cycle[i % 4], cycle[(i + 1) % 4]
            return tuple(x + y for x, y in zip(p, q))

        crossing = [i for i in range(4) if flags[i] != flags[(i + 1) % 4]]
        if len(crossing) == 2:
            segments.append((midpoint(crossing[0]), midpoint(crossing[1])))
        elif len(crossing) == 4:
            for i in range(4):
                if flags[i]:
                    segments.append((midpoint(i - 1), midpoint(i)))
    neighbours: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for p, q in segments:
        neighbours.setdefault(p, []).append(q)
        neighbours.setdefault(q, []).append(p)
    polygons = []
    visited: set[tuple[int, ...]] = set()
    for start in neighbours:
        if start in visited:
            continue
        polygon = [start]
        visited.add(start)
        previous, current = None, start
        while True:
            a, b = neighbours[current]
            nxt = b if a == previous else a
            if nxt == start:
                break
            polygon.append(nxt)
            visited.add(nxt)
            previous, current = current, nxt
        polygons.append(polygon)
    return polygons


def _triangle_area_vector(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    u = q - p
    v = r - p
    cross = np.array(
        [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]
    )
    return np.abs(cross) / 2.0


def _max_area_triangulation(vertices: np.ndarray) -> list[np.ndarray]:
    """Area vectors of the maximal-area triangulation of a (possibly non-planar) polygon."""
    n = len(vertices)
    best = np.zeros((n, n))
    split = np.full((n, n), -1, dtype=np.int64)
    for gap in range(2, n):
        for i in range(n - gap):
            j = i + gap
            best_value = -1.0
            for k in range(i + 1, j):
                area = float(
                    np.linalg.norm(_triangle_area_vector(vertices[i], vertices[k], vertices[j]))
                )
                value = best[i, k] + best[k, j] + area
                if value > best_value + 1e-12:
                    best_value, split[i, j] = value, k
            best[i, j] = best_value
    triangles: list[np.ndarray] = []
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        k = int(split[i, j])
        triangles.append(_triangle_area_vector(vertices[i], vertices[k], vertices[j]))
        stack.extend(((i, k), (k, j)))
    return triangles


@functools.cache
def _unit_area_vectors() -> tuple[np.ndarray, ...]:
    """Per neighbour code, the ``(T, 3)`` absolute area vectors of its surfel triangles (unit
    spacing)."""
    table = []
    all_corners = frozenset(_CORNERS)
    for code in range(256):
        inside = frozenset(c for c in _CORNERS if code >> _corner_bit(c) & 1)
        if len(inside) > 4:
            inside = all_corners - inside
        vectors: list[np.ndarray] = []
        for polygon in _surface_polygons(inside):
            vertices = np.asarray(polygon, dtype=np.float64) / 2.0
            vectors.extend(_max_area_triangulation(vertices))
        table.append(np.asarray(vectors, dtype=np.float64).reshape(-1, 3))
    return tuple(table)


@functools.lru_cache(maxsize=64)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    s0, s1, s2 = spacing
    scale = np.array([s1 * s2, s0 * s2, s0 * s1], dtype=np.float64)
    areas = np.zeros(256, dtype=np.float64)
    for code, vectors in enumerate(_unit_area_vectors()):
        total = 0.0
        for vector in vectors:
            total += float(np.linalg.norm(vector * scale))
        areas[code] = total
    areas.setflags(write=False)
    return areas


def surfel_area_table(spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Surface area (mm²) of the surfel of each of the 256 neighbour codes.

    Args:
        spacing: voxel size (mm) along array axes 0, 1, 2.

    Returns:
        read-only ``(256,)`` float64 array; entries 0 and 255 are 0.
    """
    return _surfel_area_table(_spacing3(spacing))


# ---------------------------------------------------------------------------------------------
# Surface distances
# ---------------------------------------------------------------------------------------------


class SurfaceDistances(NamedTuple):
    """Surfel distances between a label ``G`` and a prediction ``P``.

    Each array is 1-D; the distance arrays are sorted ascending (ties by area) and the area
    arrays are permuted alongside them.
    """

    distances_gt_to_pred: np.ndarray  # (n_G,) mm, distance of each surfel of G to P's surface
    distances_pred_to_gt: np.ndarray  # (n_P,) mm
    surfel_areas_gt: np.ndarray  # (n_G,) mm²
    surfel_areas_pred: np.ndarray  # (n_P,) mm²


def _spacing3(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3:
        raise ValueError(f"spacing must have 3 entries, got {spacing!r}")
    if not all(s > 0 for s in values):
        raise ValueError(f"spacing must be positive, got {spacing!r}")
    return values  # type: ignore[return-value]


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Inclusive-exclusive bounding box of the non-zero voxels.

    Args:
        mask: array of any shape ``(A0, ..., An)``.

    Returns:
        ``(lo, hi)`` with ``mask[lo0:hi0, ...]`` containing every non-zero voxel, or None when
        the mask is empty.
    """
    m = np.asarray(mask) != 0
    lo, hi = [], []
    for axis in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != axis)
        nz = np.flatnonzero(np.any(m, axis=other) if other else m)
        if nz.size == 0:
            return None
        lo.append(int(nz[0]))
        hi.append(int(nz[-1]) + 1)
    return tuple(lo), tuple(hi)


def _neighbour_codes(crop: np.ndarray) -> np.ndarray:
    """8-bit neighbour code of every corner-grid point of a (cropped) binary volume.

    Args:
        crop: ``(n0, n1, n2)`` bool.

    Returns:
        ``(n0+1, n1+1, n2+1)`` uint8; entry ``(i, j, k)`` encodes the voxels
        ``[i-1:i+1, j-1:j+1, k-1:k+1]`` (zero outside the crop).
    """
    padded = np.pad(crop, 1).view(np.uint8)
    n0, n1, n2 = (d + 1 for d in crop.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for a, b, c in _CORNERS:
        shifted = padded[a : a + n0, b : b + n1, c : c + n2]
        codes |= shifted << np.uint8(_corner_bit((a, b, c)))
    return codes


def _edt_distances(
    target_border: np.ndarray, query_border: np.ndarray, spacing: tuple[float, float, float]
) -> np.ndarray:
    if not target_border.any():
        return np.full(int(np.count_nonzero(query_border)), np.inf)
    dist = ndimage.distance_transform_edt(~target_border, sampling=spacing)
    return dist[query_border]


def _kdtree_distances(
    target_points: np.ndarray,
    query_points: np.ndarray,
    spacing: tuple[float, float, float],
    max_distance: float | None = None,
) -> np.ndarray:
    """Distance of each query point to the nearest target point (corner-grid indices).

    With ``max_distance`` the search is pruned: every distance ``<= max_distance`` is exact,
    larger ones may be reported as ``inf``.
    """
    if len(target_points) == 0:
        return np.full(len(query_points), np.inf)
    if len(query_points) == 0:
        return np.zeros(0)
    scale = np.asarray(spacing, dtype=np.float64)
    tree = cKDTree(target_points * scale)
    bound = np.inf if max_distance is None else max_distance * (1.0 + 1e-9) + 1e-9
    _, nearest = tree.query(query_points * scale, k=1, distance_upper_bound=bound, workers=-1)
    found = nearest < len(target_points)
    out = np.full(len(query_points), np.inf)
    # Same arithmetic as scipy's transform: integer offsets scaled per axis, squared, summed
    # over the axes in order, square root.
    delta = (target_points[nearest[found]] - query_points[found]).astype(np.float64) * scale
    delta *= delta
    out[found] = np.sqrt(delta[:, 0] + delta[:, 1] + delta[:, 2])
    return out


def _sorted(distances: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((areas, distances))
    return distances[order], areas[order]


def _surface_distances(
    y_pred: np.ndarray,
    y: np.ndarray,
    spacing: Sequence[float],
    method: str,
    max_distance: float | None,
) -> SurfaceDistances:
    """Unsorted surfel distances; see :func:`surface_distances`."""
    sp = _spacing3(spacing)
    p = np.asarray(y_pred) != 0
    g = np.asarray(y) != 0
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"expected two 3-D masks of equal shape, got {p.shape} and {g.shape}")
    box = bounding_box(p | g)
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty.copy(), empty.copy(), empty.copy())
    lo, hi = box
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    codes_g = _neighbour_codes(g[window])
    codes_p = _neighbour_codes(p[window])
    border_g = (codes_g != 0) & (codes_g != 255)
    border_p = (codes_p != 0) & (codes_p != 255)
    table = _surfel_area_table(sp)
    areas_g = table[codes_g[border_g]]
    areas_p = table[codes_p[border_p]]
    if method == "auto":
        method = "kdtree" if codes_g.size > _AUTO_KDTREE_VOXELS else "edt"
    if method == "edt":
        d_gp = _edt_distances(border_p, border_g, sp)
        d_pg = _edt_distances(border_g, border_p, sp)
    elif method == "kdtree":
        pts_g = np.argwhere(border_g)
        pts_p = np.argwhere(border_p)
        d_gp = _kdtree_distances(pts_p, pts_g, sp, max_distance)
        d_pg = _kdtree_distances(pts_g, pts_p, sp, max_distance)
    else:
        raise ValueError(f"unknown method {method!r}")
    return SurfaceDistances(d_gp, d_pg, areas_g, areas_p)


def surface_distances(
    y_pred: np.ndarray,
    y: np.ndarray,
    spacing: Sequence[float],
    *,
    method: Literal["auto", "edt", "kdtree"] = "auto",
) -> SurfaceDistances:
    """Distances between the surfels of a prediction and a label.

    Args:
        y_pred: ``(A0, A1, A2)`` prediction mask; non-zero = foreground.
        y: ``(A0, A1, A2)`` label mask.
        spacing: voxel size (mm) along A0, A1, A2.
        method: ``"edt"`` (Euclidean distance transform of the other surface on the crop),
            ``"kdtree"`` (nearest-surfel search; same values to the last bit), or ``"auto"``
            (``"edt"`` for
            crops up to 2**20 corner points, ``"kdtree"`` above).

    Returns:
        :class:`SurfaceDistances`, each pair sorted by (distance, area). Both masks empty →
        four empty arrays; one empty → its arrays are empty and all distances of the other
        are ``inf``.
    """
    d_gp, d_pg, areas_g, areas_p = _surface_distances(y_pred, y, spacing, method, None)
    d_gp, areas_g = _sorted(d_gp, areas_g)
    d_pg, areas_p = _sorted(d_pg, areas_p)
    return SurfaceDistances(d_gp, d_pg, areas_g, areas_p)


def nsd_from_distances(distances: SurfaceDistances, tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm`` from precomputed surfel distances.

    Returns:
        surfel-area fraction within the tolerance (``distance <= tolerance_mm``) over both
        surfaces; NaN when both surfaces are empty.
    """
    total = float(np.sum(distances.surfel_areas_gt)) + float(np.sum(distances.surfel_areas_pred))
    if total == 0.0:
        return float("nan")
    inside = float(
        np.sum(distances.surfel_areas_gt[distances.distances_gt_to_pred <= tolerance_mm])
    ) + float(np.sum(distances.surfel_areas_pred[distances.distances_pred_to_gt <= tolerance_mm]))
    return inside / total


def nsd(
    y_pred: np.ndarray,
    y: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
    *,
    method: Literal["auto", "edt", "kdtree"] = "auto",
) -> float:
    """Normalised surface Dice of a prediction against a label.

    Args:
        y_pred: ``(A0, A1, A2)`` prediction mask; non-zero = foreground.
        y: ``(A0, A1, A2)`` label mask.
        spacing: voxel size (mm) along A0, A1, A2.
        tolerance_mm: a surfel counts as matched when its distance to the other surface is
            ``<= tolerance_mm``.
        method: distance computation, see :func:`surface_distances`.

    Returns:
        NSD in ``[0, 1]``; NaN when both masks are empty; 0.0 when exactly one is empty.
    """
    p_any = bool(np.any(y_pred))
    g_any = bool(np.any(y))
    if not p_any and not g_any:
        return float("nan")
    if p_any != g_any:
        return 0.0
    distances = _surface_distances(y_pred, y, spacing, method, float(tolerance_mm))
    return nsd_from_distances(distances, tolerance_mm)


# ---------------------------------------------------------------------------------------------
# Multi-class evaluation
# ---------------------------------------------------------------------------------------------


def _classes_of(y: np.ndarray) -> list[int]:
    values = np.unique(np.asarray(y))
    return [int(v) for v in values if v != 0]


def per_class_metrics(
    y_pred: np.ndarray,
    y: np.ndarray,
    spacing: Sequence[float],
    *,
    classes: Sequence[int] | None = None,
    tolerance_mm: float = SAMMED3D_NSD_TOLERANCE_MM,
    metrics: Sequence[str] = ("dsc", "nsd"),
) -> dict[int, dict[str, float]]:
    """Per-class DSC and NSD of two label maps (SAM-Med3D's ``compute_metrics`` on arrays).

    Args:
        y_pred: ``(A0, A1, A2)`` integer label map (prediction).
        y: ``(A0, A1, A2)`` integer label map (ground truth).
        spacing: voxel size (mm) along A0, A1, A2 (the label's spacing).
        classes: classes to evaluate; default: the sorted non-zero values of ``y``.
        tolerance_mm: NSD tolerance (1 mm in SAM-Med3D).
        metrics: subset of ``("dsc", "nsd")``; ``"dice"`` is accepted for ``"dsc"``.

    Returns:
        ``{class: {"dsc": float, "nsd": float}}``; both masks empty → NaN, label empty but
        prediction not → 0.
    """
    wanted = {"dsc" if m.lower() == "dice" else m.lower() for m in metrics}
    unknown = wanted - {"dsc", "nsd"}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}")
    pred = np.asarray(y_pred)
    gt = np.asarray(y)
    selected = sorted(set(int(c) for c in classes)) if classes is not None else _classes_of(gt)
    results: dict[int, dict[str, float]] = {}
    for c in selected:
        g = gt == c
        p = pred == c
        entry: dict[str, float] = {}
        if "dsc" in wanted:
            entry["dsc"] = dice(p, g)
        if "nsd" in wanted:
            entry["nsd"] = nsd(p, g, spacing, tolerance_mm)
        results[c] = entry
    return results


def cvpr25_step_metrics(
    y_pred: np.ndarray,
    y: np.ndarray,
    spacing: Sequence[float],
    *,
    tolerance_mm: float = CVPR25_NSD_TOLERANCE_MM,
    dsc_threshold: float = CVPR25_NSD_DSC_THRESHOLD,
) -> tuple[float, float]:
    """Image-level DSC and NSD of one interaction step, as the CVPR 2025 challenge scores it.

    Args:
        y_pred: ``(A0, A1, A2)`` integer label map (prediction).
        y: ``(A0, A1, A2)`` integer label map (ground truth); its sorted non-zero values are
            the classes.
        spacing: voxel size (mm) along A0, A1, A2.
        tolerance_mm: NSD tolerance (2 mm in the challenge).
        dsc_threshold: NSD is computed only when the mean DSC is ``> dsc_threshold``,
            otherwise it is 0.0.

    Returns:
        ``(dsc, nsd)``: means over the classes; ``(NaN, 0.0)`` when the label has no class (a
        NaN mean DSC fails the threshold test).
    """
    pred = np.asarray(y_pred)
    gt = np.asarray(y)
    classes = _classes_of(gt)
    if not classes:
        return float("nan"), 0.0
    masks = [(pred == c, gt == c) for c in classes]
    mean_dsc = float(np.mean([dice(p, g) for p, g in masks]))
    if not mean_dsc > dsc_threshold:
        return mean_dsc, 0.0
    values = []
    for p, g in masks:
        if not p.any():
            values.append(0.0)
        else:
            values.append(nsd(p, g, spacing, tolerance_mm))
    return mean_dsc, float(np.mean(values))


def cvpr25_auc(values: Sequence[float], num_clicks: int = CVPR25_NUM_CLICKS) -> float:
    """Area under the metric-per-click curve, as the CVPR 2025 challenge computes it.

    Args:
        values: per-step metric values in interaction order (the challenge passes six: the
            box step, then five clicks).
        num_clicks: how many trailing values enter the integral (5).

    Returns:
        trapezoidal integral of ``values[-num_clicks:]`` over the abscissae
        ``0, 1, ..., num_clicks-1`` (range ``[0, num_clicks-1]`` for metrics in ``[0, 1]``).
    """
    tail = np.asarray(list(values)[-num_clicks:], dtype=np.float64)
    if tail.size < 2:
        raise ValueError("need at least two values to integrate")
    return float(integrate.cumulative_trapezoid(tail, np.arange(tail.size))[-1])


def cvpr25_summary(
    dscs: Sequence[float], nsds: Sequence[float], num_clicks: int = CVPR25_NUM_CLICKS
) -> dict[str, float]:
    """Per-case challenge aggregates from the per-step DSC and NSD lists.

    Args:
        dscs: per-step image-level DSC (box step first, then the click steps).
        nsds: per-step image-level NSD, same length.
        num_clicks: number of click steps (5).

    Returns:
        ``{"dsc_auc", "nsd_auc", "dsc_final", "nsd_final"}``.
    """
    if len(dscs) != len(nsds) or len(dscs) == 0:
        raise ValueError("dscs and nsds must be non-empty and of equal length")
    return {
        "dsc_auc": cvpr25_auc(dscs, num_clicks),
        "nsd_auc": cvpr25_auc(nsds, num_clicks),
        "dsc_final": float(dscs[-1]),
        "nsd_final": float(nsds[-1]),
    }
