"""Voxel-grid geometry of SAM-Med3D inference: resampling, re-orientation, crop/pad, z-norm.

Axis convention: every volume array is indexed in nibabel voxel-index order ``(i, j, k)``
(the original's tensor order), and every affine is a 4×4 float64 RAS+ affine mapping
``(i, j, k, 1)`` to millimetres. After :func:`to_canonical` the axes are called
``(A0, A1, A2)`` and run Left→Right, Posterior→Anterior, Inferior→Superior; all 128³ ROI
arrays use that order.

Resampling reproduces ITK 5.4's ``ResampleImageFilter`` (as driven by torchio's
``Resample``) bit for bit: grid construction, the scan-line computation of continuous
input indices in float64, the linear interpolator's nested lerps with edge clamping, the
nearest-neighbour rounding and the cast of the interpolated value to the output pixel type.
Exact half-voxel ties are frequent on these grids, so the order of every floating-point
operation below matters; the comments name the operation each step mirrors. That holds for
grids whose axes follow the patient axes (any permutation and flips, any spacing). For an
oblique grid the grid itself (size, origin, directions) still matches, but the continuous
indices come from ``np.linalg.inv`` where ITK inverts its matrix its own way, so voxels on
exact half-voxel ties can round the other way (whole planes of a label, interpolated values
differing by ~1 % there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
from nibabel import affines as nib_affines
from nibabel import orientations as nib_orientations

from sammed3d_jax.data.nifti import Volume, check_same_grid

__all__ = [
    "AxisMap",
    "EmptyNormalizationRegion",
    "Preprocessed",
    "canonical_to_source_index",
    "crop_or_pad",
    "crop_or_pad_around_mask",
    "crop_start_around_point",
    "crop_start_centered",
    "crop_start_from_mask",
    "mask_bbox",
    "merge_class_masks",
    "original_voxel_to_roi",
    "paste_back",
    "preprocess_case",
    "preprocess_for_class",
    "resample_to_grid",
    "resample_to_spacing",
    "resampled_grid",
    "roi_affine",
    "roi_to_original_voxel",
    "to_canonical",
    "torch_float32_sum",
    "voxel_to_world",
    "world_to_voxel",
    "znormalize",
]

Order = Literal["linear", "nearest"]
Triple = tuple[int, int, int]

_FLIP_XY = np.array([-1.0, -1.0, 1.0])
# Output voxels processed per slab; bounds the float64 temporaries (~8 arrays of this size).
_SLAB_VOXELS = 1 << 20


# --------------------------------------------------------------------------------------
# ITK grid description
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ItkGrid:
    """A voxel grid as ITK sees it (LPS world).

    ``index_to_point`` is ``direction · diag(spacing)`` and ``point_to_index`` its
    inverse; a physical point is ``origin + index_to_point · index``.
    """

    origin: np.ndarray  # (3,) LPS mm
    index_to_point: np.ndarray  # (3, 3)
    point_to_index: np.ndarray  # (3, 3)


def _itk_grid(affine: np.ndarray) -> _ItkGrid:
    """ITK metadata of a RAS affine, as torchio's ``nib_to_sitk`` sets it, then ITK's matrices."""
    affine = np.asarray(affine, dtype=np.float64)
    rotation_zoom = affine[:3, :3]
    spacing = np.sqrt(np.sum(rotation_zoom * rotation_zoom, axis=0))
    direction_lps = (rotation_zoom / spacing) * _FLIP_XY[:, None]
    origin_lps = affine[:3, 3] * _FLIP_XY
    # ITK: IndexToPhysicalPoint = Direction * diag(Spacing); only one product per entry.
    index_to_point = direction_lps * spacing[None, :]
    point_to_index = np.linalg.inv(index_to_point)
    return _ItkGrid(origin_lps, index_to_point, point_to_index)


def _ras_affine_from_itk(direction_lps: np.ndarray, spacing: np.ndarray, origin_lps: np.ndarray):
    """RAS affine of an ITK image, as torchio's ``get_ras_affine_from_sitk`` builds it."""
    affine = np.eye(4)
    affine[:3, :3] = (direction_lps * _FLIP_XY[:, None]) * spacing[None, :]
    affine[:3, 3] = origin_lps * _FLIP_XY
    return affine


def _index_to_point(grid: _ItkGrid, i, j, k) -> list[np.ndarray]:
    """``origin + M · (i, j, k)`` summed term by term, per LPS component (broadcasting)."""
    m = grid.index_to_point
    return [((grid.origin[r] + m[r, 0] * i) + m[r, 1] * j) + m[r, 2] * k for r in range(3)]


def _point_to_cindex(grid: _ItkGrid, point: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Continuous index ``Minv · (p − origin)``, the matrix-vector sum in column order."""
    minv = grid.point_to_index
    d = [point[c] - grid.origin[c] for c in range(3)]
    return [(minv[r, 0] * d[0] + minv[r, 1] * d[1]) + minv[r, 2] * d[2] for r in range(3)]


# Largest resampled grid (4 GiB as float32): a mistyped spacing fails with a message instead of
# exhausting the memory.
MAX_RESAMPLED_VOXELS = 2**30


def resampled_grid(
    shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float] = (1.5, 1.5, 1.5)
) -> tuple[Triple, np.ndarray]:
    """Shape and RAS affine of the centred grid that ``tio.Resample(spacing)`` builds.

    Per axis ``m = floor(n · s / spacing)`` (size-1 axes stay 1); directions are kept and
    the midpoint between the first and last voxel centres stays in place.

    Args:
      shape: ``(n_i, n_j, n_k)`` of the source grid.
      affine: (4, 4) RAS affine of the source grid.
      spacing: target spacing in mm, per source axis.

    Returns:
      ``(new_shape, new_affine)``; the new grid keeps the source's axis order.
    """
    src = _itk_grid(affine)
    rotation_zoom = np.asarray(affine, dtype=np.float64)[:3, :3]
    old_spacing = np.sqrt(np.sum(rotation_zoom * rotation_zoom, axis=0))
    direction_lps = (rotation_zoom / old_spacing) * _FLIP_XY[:, None]
    new_spacing = np.asarray(spacing, dtype=np.float64)
    old_size = np.asarray(shape, dtype=np.int64)
    last = old_size - 1
    last_lps = np.array(_index_to_point(src, float(last[0]), float(last[1]), float(last[2])))
    center_lps = (last_lps + src.origin) / 2
    new_size = np.floor(old_size * old_spacing / new_spacing)
    new_size[old_size == 1] = 1
    if (new_size < 1).any():
        axis = int(np.argmax(new_size < 1))
        raise ValueError(
            f"the volume spans {old_size[axis] * old_spacing[axis]:g} mm along voxel axis "
            f"{axis}, less than one {new_spacing[axis]:g} mm voxel of the model grid"
        )
    if np.prod(new_size) > MAX_RESAMPLED_VOXELS:
        raise ValueError(
            f"resampling to {new_spacing.tolist()} mm gives a "
            f"{' x '.join(f'{v:.4g}' for v in new_size)} grid ({np.prod(new_size):.4g} voxels, "
            f"more than {MAX_RESAMPLED_VOXELS:,}); check the voxel spacing "
            f"({' x '.join(f'{v:.4g}' for v in old_spacing)} mm in the file)"
        )
    half_extent = (new_size - 1) / 2 * new_spacing
    new_origin_lps = center_lps - direction_lps @ half_extent
    new_affine = _ras_affine_from_itk(direction_lps, new_spacing, new_origin_lps)
    return tuple(int(v) for v in new_size), new_affine


# --------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------


def _cast_like_itk(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Clamp to the output type's range, then convert (integers truncate toward zero)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(values, float(info.min), float(info.max))
        return np.trunc(out).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        info = np.finfo(dtype)
        return np.clip(values, float(info.min), float(info.max)).astype(dtype)
    if dtype == np.bool_:
        return values != 0
    raise TypeError(f"unsupported voxel dtype {dtype}")


def _sample_linear(src: np.ndarray, x: list[np.ndarray], inside: np.ndarray) -> np.ndarray:
    """ITK ``LinearInterpolateImageFunction`` at continuous indices ``x`` (float64 result).

    Neighbours are clamped to the image; an axis whose fractional distance is ≤ 0 is not
    interpolated. Lerps run along source axis 0, then 1, then 2.
    """
    n = src.shape
    flat = src.reshape(-1)
    lo, hi, t = [], [], []
    for r in range(3):
        base = np.floor(x[r])
        base = np.maximum(base, 0.0)
        dist = x[r] - base
        dist = np.where(dist > 0.0, dist, 0.0)
        b = base.astype(np.intp)
        b = np.minimum(b, n[r] - 1)  # only reached for voxels outside the buffer
        lo.append(b)
        hi.append(np.minimum(b + 1, n[r] - 1))
        t.append(dist)
    s0, s1 = n[1] * n[2], n[2]
    del base, dist, b

    def val(a, b, c):
        return flat[a * s0 + b * s1 + c].astype(np.float64)

    def lerp(a, b, w):
        return a + (b - a) * w

    i0, i1 = lo[0], hi[0]
    vx00 = lerp(val(i0, lo[1], lo[2]), val(i1, lo[1], lo[2]), t[0])
    vx10 = lerp(val(i0, hi[1], lo[2]), val(i1, hi[1], lo[2]), t[0])
    vxy0 = lerp(vx00, vx10, t[1])
    del vx00, vx10
    vx01 = lerp(val(i0, lo[1], hi[2]), val(i1, lo[1], hi[2]), t[0])
    vx11 = lerp(val(i0, hi[1], hi[2]), val(i1, hi[1], hi[2]), t[0])
    vxy1 = lerp(vx01, vx11, t[1])
    del vx01, vx11
    out = lerp(vxy0, vxy1, t[2])
    out[~inside] = 0.0
    return out


def _sample_nearest(src: np.ndarray, x: list[np.ndarray], inside: np.ndarray) -> np.ndarray:
    """ITK ``NearestNeighborInterpolateImageFunction``: index ``floor(x + 0.5)``."""
    n = src.shape
    idx = []
    for r in range(3):
        v = np.floor(x[r] + 0.5)
        v = np.clip(v, 0, n[r] - 1).astype(np.intp)
        idx.append(v)
    out = src.reshape(-1)[(idx[0] * n[1] + idx[1]) * n[2] + idx[2]]
    out[~inside] = 0
    return out


# Margins of the candidate box of :func:`_candidate_box`: in source voxels around the
# source buffer and in output voxels around the box. The scan-line indices differ from the
# exact affine map by rounding noise many orders of magnitude below one voxel.
_BOX_MARGIN_SRC = 2.0
_BOX_MARGIN_DST = 2


def _nonzero_bounds(src: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box ``[lo, hi)`` of the non-zero voxels (NaN counts as non-zero), or None."""
    nz = src != 0
    plane = nz.any(axis=2)
    profiles = (plane.any(axis=1), plane.any(axis=0), nz.any(axis=(0, 1)))
    if not profiles[0].any():
        return None
    lo = np.array([np.argmax(p) for p in profiles], dtype=np.int64)
    hi = np.array([p.size - np.argmax(p[::-1]) for p in profiles], dtype=np.int64)
    return lo, hi


def _candidate_box(
    src_grid: _ItkGrid,
    dst_grid: _ItkGrid,
    src_lo: Sequence[int],
    src_hi: Sequence[int],
    dst_shape: Sequence[int],
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """Conservative box ``[lo, hi)`` of output indices that can read source voxels in
    ``[src_lo, src_hi)``.

    The continuous source index of output index ``idx`` is (up to rounding) the affine map
    ``P · idx + q`` with ``P = Minv_src · M_dst``, ``q = Minv_src · (o_dst − o_src)``.
    Mapping the 8 corners of the continuous source box ``[src_lo − 0.5, src_hi − 0.5)``,
    widened by ``_BOX_MARGIN_SRC`` source voxels, back through its inverse and widening the
    bounding box by ``_BOX_MARGIN_DST`` output voxels gives a box outside of which every
    output voxel's scan-line index is either outside the source buffer on some axis or
    more than a voxel away from ``[src_lo, src_hi)`` (so its nearest or linear neighbours
    all lie outside that range). For permutation/flip direction maps the box is tight; for
    oblique maps it bounds the parallelepiped.

    Returns:
      ``((i0, i1), (j0, j1), (k0, k1))`` clipped to the output grid, or None when the box
      is empty. Falls back to the whole grid if the map is not invertible or not finite.
    """
    full = tuple((0, int(m)) for m in dst_shape)
    p = src_grid.point_to_index @ dst_grid.index_to_point
    q = src_grid.point_to_index @ (dst_grid.origin - src_grid.origin)
    lo_src = np.asarray(src_lo, dtype=np.float64) - 0.5 - _BOX_MARGIN_SRC
    hi_src = np.asarray(src_hi, dtype=np.float64) - 0.5 + _BOX_MARGIN_SRC
    corners = np.array(
        [[hi_src[r] if (c >> r) & 1 else lo_src[r] for r in range(3)] for c in range(8)]
    )
    with np.errstate(all="ignore"):
        try:
            p_inv = np.linalg.inv(p)
        except np.linalg.LinAlgError:
            return full
        idx = (corners - q) @ p_inv.T
    if not np.isfinite(idx).all():
        return full
    m = np.asarray(dst_shape, dtype=np.float64)
    lo = np.clip(np.floor(idx.min(axis=0)) - _BOX_MARGIN_DST, 0.0, m)
    hi = np.clip(np.ceil(idx.max(axis=0)) + _BOX_MARGIN_DST + 1, 0.0, m)
    if (hi <= lo).any():
        return None
    return tuple((int(a), int(b)) for a, b in zip(lo, hi))


def _check_resample_args(array: np.ndarray, order: str) -> np.ndarray:
    src = np.ascontiguousarray(array)
    if src.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {src.shape}")
    if order not in ("linear", "nearest"):
        raise ValueError(f"order must be 'linear' or 'nearest', got {order!r}")
    return src


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    target_shape: Sequence[int],
    target_affine: np.ndarray,
    order: Order,
) -> np.ndarray:
    """Resample a volume onto an arbitrary target grid with ITK 5.4's arithmetic.

    For each output line along the target's first axis, the continuous source indices of
    output index ``(0, j, k)`` and of the one-past-the-end ``(m0, j, k)`` are computed in
    float64; voxel ``i`` uses ``x = x_start + (i / m0) · (x_end − x_start)``. Voxels whose
    index lies outside ``[−0.5, n − 0.5)`` on any source axis get 0.

    Only the output box that can map inside the source (:func:`_candidate_box`, with a
    margin of a couple of voxels) is computed; every voxel in it goes through exactly the
    floating-point operations of the full-grid computation
    (:func:`_resample_to_grid_reference`), so the result is bit-identical, and everything
    outside it is 0. With ``order="nearest"`` the source box is narrowed further to the
    bounding box of the non-zero source voxels (nearest neighbour only copies values, so
    nothing else can be non-zero). This matters for :func:`paste_back`, where a 128³ ROI
    (and the prediction inside it) covers a small part of a large original grid. For
    grids related by axis permutations and flips, nearest-neighbour values come from 1-D
    index computations (:func:`_nearest_separable`, same arithmetic, bit-identical).

    Args:
      array: source volume, shape ``(n0, n1, n2)`` in the source grid's voxel order.
      affine: (4, 4) RAS affine of the source grid.
      target_shape: ``(m0, m1, m2)`` of the output grid.
      target_affine: (4, 4) RAS affine of the output grid.
      order: ``"linear"`` (images) or ``"nearest"`` (label maps).

    Returns:
      Array of shape ``target_shape`` and the source dtype, in the target's voxel order.
      Linear values are computed in float64 and cast like ITK: clamped to the dtype's
      range, integers truncated toward zero.
    """
    src = _check_resample_args(array, order)
    m0, m1, m2 = (int(v) for v in target_shape)
    src_grid = _itk_grid(affine)
    dst_grid = _itk_grid(target_affine)
    n = src.shape
    out = np.zeros((m0, m1, m2), dtype=src.dtype)
    if min(m0, m1, m2) == 0:
        return out
    if order == "nearest":
        bounds = _nonzero_bounds(src)
        if bounds is None:
            return out
        src_lo, src_hi = bounds
    else:
        src_lo, src_hi = (0, 0, 0), n
    box = _candidate_box(src_grid, dst_grid, src_lo, src_hi, (m0, m1, m2))
    if box is None:
        return out
    (i0, i1), (j0, j1), (k0, k1) = box

    if order == "nearest":
        fast = _nearest_separable(src, src_grid, dst_grid, (m0, m1, m2), box)
        if fast is not None:
            out[i0:i1, j0:j1, k0:k1] = fast
            return out

    # The same index values as the full computation, sliced to the box.
    j = np.arange(m1, dtype=np.float64)[j0:j1, None]
    alpha = (np.arange(m0, dtype=np.float64) / float(m0))[i0:i1, None, None]
    k_all = np.arange(m2, dtype=np.float64)
    k_per_slab = max(1, _SLAB_VOXELS // ((i1 - i0) * (j1 - j0)))
    for k_lo in range(k0, k1, k_per_slab):
        k_hi = min(k1, k_lo + k_per_slab)
        k = k_all[None, k_lo:k_hi]
        start = _point_to_cindex(src_grid, _index_to_point(dst_grid, 0.0, j, k))
        end = _point_to_cindex(src_grid, _index_to_point(dst_grid, float(m0), j, k))
        x = [start[r][None] + alpha * (end[r] - start[r])[None] for r in range(3)]
        del start, end
        inside = np.ones(x[0].shape, dtype=bool)
        for r in range(3):
            inside &= (x[r] >= -0.5) & (x[r] < n[r] - 0.5)
        if order == "nearest":
            values = _sample_nearest(src, x, inside)
        else:
            values = _cast_like_itk(_sample_linear(src, x, inside), src.dtype)
        out[i0:i1, j0:j1, k_lo:k_hi] = values
    return out


def _nearest_separable(
    src: np.ndarray,
    src_grid: _ItkGrid,
    dst_grid: _ItkGrid,
    dst_shape: tuple[int, int, int],
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]],
) -> np.ndarray | None:
    """Nearest-neighbour values on ``box`` when every source index follows one output axis.

    For grids related by axis permutations and flips (the pipeline's ROI and original grids)
    the scan-line formula of :func:`resample_to_grid` gives each source axis's continuous
    index as a function of a single output index. Checked exactly on the computed start
    and end indices, that lets the same floating-point operations run on 1-D arrays, and
    the gather becomes three ``take``s: bit-identical to the general path. Returns None
    (general path) for any other map, e.g. oblique grids.
    """
    (i0, i1), (j0, j1), (k0, k1) = box
    m0 = dst_shape[0]
    j = np.arange(dst_shape[1], dtype=np.float64)[j0:j1, None]
    k = np.arange(dst_shape[2], dtype=np.float64)[None, k0:k1]
    start = _point_to_cindex(src_grid, _index_to_point(dst_grid, 0.0, j, k))
    end = _point_to_cindex(src_grid, _index_to_point(dst_grid, float(m0), j, k))
    alpha = (np.arange(m0, dtype=np.float64) / float(m0))[i0:i1]
    plane = (j1 - j0, k1 - k0)
    source_of_axis: dict[int, int] = {}
    x_of_source: dict[int, np.ndarray] = {}
    constant = []
    for r in range(3):
        st, en = np.broadcast_to(start[r], plane), np.broadcast_to(end[r], plane)
        if (st == st[0, 0]).all() and (en == en[0, 0]).all():
            if en[0, 0] != st[0, 0]:  # along i: x = start + alpha (end - start)
                axis, x = 0, st[0, 0] + alpha * (en[0, 0] - st[0, 0])
            else:  # constant: x = start + alpha * 0
                constant.append(r)
                x_of_source[r] = st[0, :1] + alpha[:1] * 0.0
                continue
        elif (en == st).all() and (st == st[:, :1]).all():  # along j only
            axis, x = 1, st[:, 0] + alpha[0] * 0.0
        elif (en == st).all() and (st == st[:1, :]).all():  # along k only
            axis, x = 2, st[0, :] + alpha[0] * 0.0
        else:
            return None
        if axis in source_of_axis:
            return None
        source_of_axis[axis], x_of_source[r] = r, x
    for r in constant:  # a constant index can only stand for an output axis of length 1
        free = [a for a in range(3) if a not in source_of_axis and box[a][1] - box[a][0] == 1]
        if not free:
            return None
        source_of_axis[free[0]] = r
    n = src.shape
    values = src.transpose([source_of_axis[a] for a in range(3)])
    inside = []
    for a in range(3):
        r = source_of_axis[a]
        x = x_of_source[r]
        idx = np.clip(np.floor(x + 0.5), 0, n[r] - 1).astype(np.intp)
        values = np.take(values, idx, axis=a)
        inside.append((x >= -0.5) & (x < n[r] - 0.5))
    values = np.ascontiguousarray(values)
    values[~inside[0]] = 0
    values[:, ~inside[1]] = 0
    values[:, :, ~inside[2]] = 0
    return values


def _resample_to_grid_reference(
    array: np.ndarray,
    affine: np.ndarray,
    target_shape: Sequence[int],
    target_affine: np.ndarray,
    order: Order,
) -> np.ndarray:
    """:func:`resample_to_grid` over every voxel of the output grid (no candidate box).

    The original full-grid computation, kept as the reference the box-restricted version
    is tested against bit for bit.
    """
    src = _check_resample_args(array, order)
    m0, m1, m2 = (int(v) for v in target_shape)
    src_grid = _itk_grid(affine)
    dst_grid = _itk_grid(target_affine)
    n = src.shape
    out = np.zeros((m0, m1, m2), dtype=src.dtype)
    if min(m0, m1, m2) == 0:
        return out

    j = np.arange(m1, dtype=np.float64)[:, None]
    alpha = (np.arange(m0, dtype=np.float64) / float(m0))[:, None, None]
    k_per_slab = max(1, _SLAB_VOXELS // (m0 * m1))
    for k_lo in range(0, m2, k_per_slab):
        k = np.arange(k_lo, min(m2, k_lo + k_per_slab), dtype=np.float64)[None, :]
        start = _point_to_cindex(src_grid, _index_to_point(dst_grid, 0.0, j, k))
        end = _point_to_cindex(src_grid, _index_to_point(dst_grid, float(m0), j, k))
        x = [start[r][None] + alpha * (end[r] - start[r])[None] for r in range(3)]
        del start, end
        inside = np.ones(x[0].shape, dtype=bool)
        for r in range(3):
            inside &= (x[r] >= -0.5) & (x[r] < n[r] - 0.5)
        if order == "nearest":
            values = _sample_nearest(src, x, inside)
        else:
            values = _cast_like_itk(_sample_linear(src, x, inside), src.dtype)
        out[:, :, k_lo : k_lo + k.shape[1]] = values
    return out


def resample_to_spacing(
    array: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    order: Order = "linear",
) -> tuple[np.ndarray, np.ndarray]:
    """``tio.Resample(spacing)``: resample onto the centred grid of :func:`resampled_grid`.

    Args:
      array: volume ``(i, j, k)``.
      affine: its (4, 4) RAS affine.
      spacing: target spacing in mm per source axis.
      order: ``"linear"`` for images, ``"nearest"`` for label maps.

    Returns:
      ``(resampled, new_affine)``; ``resampled`` keeps the axis order ``(i, j, k)`` and the
      dtype of ``array``.
    """
    new_shape, new_affine = resampled_grid(np.shape(array), affine, spacing)
    return resample_to_grid(array, affine, new_shape, new_affine, order), new_affine


# --------------------------------------------------------------------------------------
# Re-orientation
# --------------------------------------------------------------------------------------


class AxisMap(NamedTuple):
    """Where a canonical axis comes from: ``canonical = (source_len − 1) − source`` if reversed."""

    source_axis: int
    reversed: bool
    source_len: int


def to_canonical(
    array: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[AxisMap, AxisMap, AxisMap]]:
    """Re-orient to RAS+ like ``nibabel.as_closest_canonical`` (permutation and flips only).

    Args:
      array: volume ``(i, j, k)``.
      affine: its (4, 4) RAS affine.

    Returns:
      ``(canonical, canonical_affine, axis_map)``: ``canonical`` is indexed ``(A0, A1, A2)``
      (L→R, P→A, I→S), and ``axis_map[a]`` tells which source axis canonical axis ``a`` reads
      and whether it is reversed.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib_orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        raise ValueError("affine has no well-defined orientation")
    shape = np.shape(array)
    axis_map = [None, None, None]
    for src_axis, (dst_axis, flip) in enumerate(ornt):
        axis_map[int(dst_axis)] = AxisMap(src_axis, bool(flip < 0), int(shape[src_axis]))
    if nib_orientations.aff2axcodes(affine) == ("R", "A", "S"):
        return np.asarray(array), affine.copy(), tuple(axis_map)
    canonical = nib_orientations.apply_orientation(np.asarray(array), ornt)
    new_affine = affine.dot(nib_orientations.inv_ornt_aff(ornt, shape))
    return np.ascontiguousarray(canonical), new_affine, tuple(axis_map)


def canonical_to_source_index(
    canonical_index: np.ndarray, axis_map: Sequence[AxisMap]
) -> np.ndarray:
    """Map (continuous) canonical voxel indices ``(..., 3)`` back to source-grid indices."""
    c = np.asarray(canonical_index, dtype=np.float64)
    out = np.empty_like(c)
    for a, m in enumerate(axis_map):
        v = c[..., a]
        out[..., m.source_axis] = (m.source_len - 1) - v if m.reversed else v
    return out


# --------------------------------------------------------------------------------------
# Crop / pad (torchio CropOrPad)
# --------------------------------------------------------------------------------------


def _triple(target: int | Sequence[int]) -> np.ndarray:
    t = np.broadcast_to(np.asarray(target, dtype=np.int64), (3,))
    return t.copy()


def mask_bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box ``[lo, hi)`` (int64 ``(3,)`` each) of the non-zero voxels, or None."""
    mask = np.asarray(mask) != 0
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        lo.append(hit[0])
        hi.append(hit[-1] + 1)
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)


def crop_start_from_mask(mask: np.ndarray, target: int | Sequence[int] = 128) -> np.ndarray | None:
    """``CropOrPad(mask_name=...)`` box start: ``floor((lo + hi − target) / 2)`` per axis.

    For an even target this is ``floor((lo + hi) / 2) − target / 2``. Returns None for an
    empty mask.
    """
    box = mask_bbox(mask)
    if box is None:
        return None
    lo, hi = box
    return (lo + hi - _triple(target)) // 2


def crop_start_centered(shape: Sequence[int], target: int | Sequence[int] = 128) -> np.ndarray:
    """Centred box start (torchio's fallback): the low side gets ``ceil(|diff| / 2)``."""
    diff = _triple(target) - np.asarray(shape, dtype=np.int64)
    # pad (diff > 0): start = -ceil(diff / 2); crop (diff < 0): start = ceil(-diff / 2).
    return np.where(diff > 0, -((diff + 1) // 2), (-diff + 1) // 2)


def crop_start_around_point(
    center: Sequence[float], target: int | Sequence[int] = 128
) -> np.ndarray:
    """Box start that treats voxel ``round(center)`` like a one-voxel mask.

    The voxel nearest to ``center`` (canonical voxel coordinates) lands at ROI index
    ``target // 2``.
    """
    r = np.floor(np.asarray(center, dtype=np.float64) + 0.5).astype(np.int64)
    return (2 * r + 1 - _triple(target)) // 2


def crop_or_pad(
    array: np.ndarray, start: Sequence[int], target: int | Sequence[int] = 128
) -> np.ndarray:
    """Cut the box ``[start, start + target)`` out of ``array``; outside voxels are 0.

    Args:
      array: ``(A0, A1, A2)`` volume.
      start: box start per axis (negative = padding).
      target: box size.

    Returns:
      Array of shape ``target`` and ``array``'s dtype.
    """
    start = np.asarray(start, dtype=np.int64)
    size = _triple(target)
    out = np.zeros(tuple(size), dtype=array.dtype)
    src, dst = [], []
    for a in range(3):
        lo = max(0, int(start[a]))
        hi = min(array.shape[a], int(start[a] + size[a]))
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(start[a]), hi - int(start[a])))
    out[tuple(dst)] = array[tuple(src)]
    return out


def crop_or_pad_around_mask(
    array: np.ndarray, mask: np.ndarray, target: int | Sequence[int] = 128
) -> tuple[np.ndarray, np.ndarray]:
    """``tio.CropOrPad(target, mask_name=...)`` on ``array``.

    Args:
      array: ``(A0, A1, A2)`` volume.
      mask: same shape; the box is centred on its non-zero bounding box (centred on the
        volume when it is empty).
      target: output size per axis.

    Returns:
      ``(crop, start)``: the ``target``-sized crop (padding 0) and the int64 ``(3,)`` start.
    """
    if np.shape(mask) != np.shape(array):
        raise ValueError(f"mask shape {np.shape(mask)} != array shape {np.shape(array)}")
    start = crop_start_from_mask(mask, target)
    if start is None:
        start = crop_start_centered(np.shape(array), target)
    return crop_or_pad(array, start, target), start


def roi_affine(canonical_affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """Affine of the crop box: the canonical affine with its origin moved to voxel ``start``.

    Computed as torchio does it (padding moves the origin by ``−pad_low``, then cropping by
    ``crop_low``), so the result is bit-identical to the original's ROI affine.
    """
    start = np.asarray(start, dtype=np.int64)
    pad_low = np.maximum(-start, 0)
    crop_low = np.maximum(start, 0)
    affine = np.array(canonical_affine, dtype=np.float64)
    affine[:3, 3] = nib_affines.apply_affine(affine, -pad_low)
    affine[:3, 3] = nib_affines.apply_affine(affine, crop_low)
    return affine


# --------------------------------------------------------------------------------------
# Z-normalisation (torch float32 statistics)
# --------------------------------------------------------------------------------------

_TORCH_VEC_LANES = 8  # float32 lanes of ATen's AVX2 Vectorized<float>
_TORCH_THREADS = 2  # intra-op threads of the run that produced the reference statistics
_TORCH_GRAIN = 32768


def _ceil_log2(x: int) -> int:
    return 0 if x <= 1 else int(x - 1).bit_length()


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """ATen ``multi_row_sum``: 4-level cascade over the rows of a ``(size, lanes)`` array."""
    size = rows.shape[0]
    num_levels = 4
    level_power = max(4, _ceil_log2(size) // num_levels)
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc = np.zeros((num_levels, rows.shape[1]), dtype=np.float32)
    i = 0
    while i + level_step <= size:
        # Sequential float32 accumulation of one block into a zeroed level-0 accumulator.
        acc[0] = acc[0] + np.cumsum(rows[i : i + level_step], axis=0, dtype=np.float32)[-1]
        i += level_step
        for j in range(1, num_levels):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = 0.0
            if i & (level_mask << (j * level_power)):
                break
    for r in range(i, size):
        acc[0] = acc[0] + rows[r]
    for j in range(1, num_levels):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _torch_chunk_sum(values: np.ndarray, lanes: int) -> np.float32:
    """ATen ``cascade_sum`` of one contiguous float32 chunk (vectorised inner sum)."""
    size0 = values.shape[0]
    if size0 >= lanes:
        vec_size = size0 // lanes
        ilp = 4
        size_ilp = vec_size // ilp
        vec_rows = values[: size_ilp * ilp * lanes].reshape(size_ilp, ilp * lanes)
        partial = _multi_row_sum(vec_rows).reshape(ilp, lanes)
        for v in range(size_ilp * ilp, vec_size):
            partial[0] = partial[0] + values[v * lanes : (v + 1) * lanes]
        for k in range(1, ilp):
            partial[0] = partial[0] + partial[k]
        final = np.float32(0.0)
        for v in values[vec_size * lanes :]:
            final = np.float32(final + v)
        for v in partial[0]:
            final = np.float32(final + v)
        return final
    # Scalar path: row_sum with 4-way interleaving over single elements.
    ilp = 4
    size_ilp = size0 // ilp
    partial = _multi_row_sum(values[: size_ilp * ilp].reshape(size_ilp, ilp))
    for v in values[size_ilp * ilp :]:
        partial[0] = np.float32(partial[0] + v)
    total = partial[0]
    for k in range(1, ilp):
        total = np.float32(total + partial[k])
    return np.float32(total)


def torch_float32_sum(
    values: np.ndarray, *, lanes: int = _TORCH_VEC_LANES, threads: int = _TORCH_THREADS
) -> np.float32:
    """``torch.sum`` of a contiguous 1-D float32 tensor on CPU, reproduced in numpy.

    ATen accumulates float32 in float32 with a vectorised 4-level cascade; with several
    threads the tensor is split into ``ceil(n / threads)``-sized chunks whose sums are
    added at the end.

    Args:
      values: 1-D float32 array.
      lanes: SIMD width in float32 lanes of the reference build (8 = AVX2, 16 = AVX-512).
      threads: intra-op thread count of the reference run.
    """
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = values.shape[0]
    if n < _TORCH_GRAIN or threads == 1:
        return np.float32(np.float32(0.0) + _torch_chunk_sum(values, lanes))
    tasks = min(threads, -(-n // _TORCH_GRAIN))
    chunk = -(-n // tasks)
    partials = np.zeros(threads, dtype=np.float32)
    for t in range(tasks):
        lo = t * chunk
        if lo < n:
            partials[t] = _torch_chunk_sum(values[lo : min(n, lo + chunk)], lanes)
    return np.float32(np.float32(0.0) + _torch_chunk_sum(partials, lanes))


class EmptyNormalizationRegion(ValueError):
    """Fewer than two ROI voxels are > 0: z-normalisation statistics are undefined."""


def znormalize(roi: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``tio.ZNormalization(masking_method=lambda x: x > 0)`` on one ROI.

    Statistics use only voxels with value > 0: the mean as torch computes it (float32 sum
    divided by the count in float32) and the unbiased std as torch's CPU all-reduce does
    (two-pass in float64 around the float32 mean, rounded to float32). Every voxel is then
    mapped to ``(x − mean) / std`` in float32, so padding zeros become ``−mean / std``.

    Args:
      roi: ``(A0, A1, A2)`` volume of any real dtype.

    Returns:
      ``(normalised float32 array, mean, std)``; ``mean`` and ``std`` are float32 values.

    Raises:
      EmptyNormalizationRegion: fewer than two voxels are > 0.
      ValueError: their std is 0, or their mean or std overflows float32.
    """
    roi = np.asarray(roi)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, by name
        data = roi.astype(np.float32)
        values = data[roi > 0]
        n = values.size
        if n < 2:
            raise EmptyNormalizationRegion(
                f"z-normalisation needs at least 2 voxels > 0 in the ROI, found {n}"
            )
        mean32 = np.float32(torch_float32_sum(values) / np.float32(n))
        dx = values.astype(np.float64) - float(mean32)
        std32 = np.float32(np.sqrt(np.dot(dx, dx) / (n - 1)))
    if not (np.isfinite(mean32) and np.isfinite(std32)):
        raise ValueError(
            "z-normalisation: the intensities overflow float32 (their mean or std is not "
            f"finite; largest |value| {float(np.max(np.abs(roi))):.3g}): rescale the image"
        )
    if std32 == 0:
        raise ValueError("z-normalisation: the std of the voxels > 0 is 0 (constant ROI)")
    out = (data - mean32) / std32
    return out.astype(np.float32, copy=False), float(mean32), float(std32)


# --------------------------------------------------------------------------------------
# Whole pipeline
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessed:
    """One class's model input and everything needed to map results back.

    Arrays of the ROI are ``(A0, A1, A2)``, ``crop_size`` per axis.

    Attributes:
      class_id: the label value this ROI was built for.
      roi_image: float32 z-normalised image (the model input ``roi_image[0, 0]``).
      roi_label: uint8 0/1 label crop, or None without a label.
      roi_raw: image crop before normalisation, in the input file's dtype.
      roi_affine: (4, 4) RAS affine of the ROI grid.
      start: int64 ``(3,)`` box start in the canonical grid (negative = padding).
      bbox: label bounding box ``(lo, hi)`` in the canonical grid, or None.
      canonical_shape, canonical_affine: resampled RAS+ grid.
      resampled_shape, resampled_affine: resampled grid in the file's axis order.
      axis_map: per canonical axis, its source axis in the resampled grid.
      original_shape, original_affine: the input image's grid.
      mean, std, n_mask_voxels: z-normalisation statistics (float32 values).
    """

    class_id: int | None
    roi_image: np.ndarray
    roi_label: np.ndarray | None
    roi_raw: np.ndarray
    roi_affine: np.ndarray
    start: np.ndarray
    bbox: tuple[np.ndarray, np.ndarray] | None
    canonical_shape: Triple
    canonical_affine: np.ndarray
    resampled_shape: Triple
    resampled_affine: np.ndarray
    axis_map: tuple[AxisMap, AxisMap, AxisMap]
    original_shape: Triple
    original_affine: np.ndarray
    mean: float
    std: float
    n_mask_voxels: int


@dataclasses.dataclass(frozen=True)
class _CanonicalImage:
    array: np.ndarray
    affine: np.ndarray
    resampled_shape: Triple
    resampled_affine: np.ndarray
    axis_map: tuple[AxisMap, AxisMap, AxisMap]


def _canonical_image(image: Volume, spacing: Sequence[float]) -> _CanonicalImage:
    resampled, res_affine = resample_to_spacing(image.array, image.affine, spacing, "linear")
    canonical, can_affine, axis_map = to_canonical(resampled, res_affine)
    return _CanonicalImage(canonical, can_affine, resampled.shape, res_affine, axis_map)


def _canonical_label(label: Volume, spacing: Sequence[float]) -> np.ndarray:
    # Nearest neighbour only copies source values, so resampling the multi-class map once
    # and binarising afterwards equals binarising first (class ids are never 0).
    resampled, res_affine = resample_to_spacing(label.array, label.affine, spacing, "nearest")
    return to_canonical(resampled, res_affine)[0]


def _build(
    image: Volume,
    can: _CanonicalImage,
    can_label: np.ndarray | None,
    class_id: int | None,
    crop_size: int,
    center: Sequence[float] | None,
    nan_if_undefined: bool = False,
) -> Preprocessed:
    binary = None if can_label is None else (can_label == class_id).astype(np.uint8)
    bbox = None if binary is None else mask_bbox(binary)
    if center is not None:
        start = crop_start_around_point(center, crop_size)
    elif bbox is not None:
        start = (bbox[0] + bbox[1] - _triple(crop_size)) // 2
    else:
        start = crop_start_centered(can.array.shape, crop_size)
    roi_raw = crop_or_pad(can.array, start, crop_size)
    roi_label = None if binary is None else crop_or_pad(binary, start, crop_size)
    try:
        roi_image, mean, std = znormalize(roi_raw)
    except EmptyNormalizationRegion:
        if not nan_if_undefined:
            raise
        # torchio's statistics of an empty selection are NaN, and so is the whole ROI.
        roi_image = np.full(roi_raw.shape, np.nan, np.float32)
        mean = std = float("nan")
    return Preprocessed(
        class_id=class_id,
        roi_image=roi_image,
        roi_label=roi_label,
        roi_raw=roi_raw,
        roi_affine=roi_affine(can.affine, start),
        start=np.asarray(start, dtype=np.int64),
        bbox=bbox,
        canonical_shape=tuple(int(v) for v in can.array.shape),
        canonical_affine=can.affine,
        resampled_shape=tuple(int(v) for v in can.resampled_shape),
        resampled_affine=can.resampled_affine,
        axis_map=can.axis_map,
        original_shape=tuple(int(v) for v in image.array.shape),
        original_affine=np.asarray(image.affine, dtype=np.float64),
        mean=mean,
        std=std,
        n_mask_voxels=int(np.count_nonzero(roi_raw > 0)),
    )


def preprocess_for_class(
    image: Volume,
    label: Volume | None,
    class_id: int | None,
    crop_size: int = 128,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    center: Sequence[float] | None = None,
) -> Preprocessed:
    """The original ``data_preprocess`` for one class.

    Binarise the label (``== class_id``), resample image (linear) and label (nearest) to
    ``spacing``, re-orient to RAS+, crop/pad ``crop_size``³ around the label's bounding box
    (or around ``center``, canonical voxel coordinates, when given; centred on the volume
    when there is neither), and z-normalise the image crop.

    Args:
      image: the input image volume ``(i, j, k)``.
      label: the multi-class label on the same grid, or None for label-free inference.
      class_id: the label value to segment (a positive integer; ignored without a label).
      crop_size: ROI edge length in voxels.
      spacing: resampling spacing in mm.
      center: optional crop centre in canonical voxel coordinates ``(A0, A1, A2)``.

    Returns:
      A :class:`Preprocessed` record.
    """
    if label is not None:
        if class_id is None:
            raise ValueError("class_id is required when a label is given")
        check_same_grid(image, label)
    can = _canonical_image(image, spacing)
    can_label = None if label is None else _canonical_label(label, spacing)
    class_id = None if label is None else _as_class_id(class_id)
    return _build(image, can, can_label, class_id, crop_size, center)


def _as_class_id(value: float) -> int:
    if not float(value).is_integer() or value <= 0:
        raise ValueError(f"class ids must be positive integers, got {value!r}")
    return int(value)


def preprocess_case(
    image: Volume,
    label: Volume,
    class_ids: Sequence[int] | None = None,
    crop_size: int = 128,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    nan_if_undefined: bool = False,
) -> dict[int, Preprocessed]:
    """:func:`preprocess_for_class` for several classes, resampling each volume once.

    Args:
      image, label: input volumes on the same grid.
      class_ids: classes to prepare; default: the sorted non-zero values of the label.
      nan_if_undefined: a class ROI with fewer than two voxels > 0 gets an all-NaN
        ``roi_image`` (what the original computes) instead of raising
        :class:`EmptyNormalizationRegion`.

    Returns:
      ``{class_id: Preprocessed}`` in ascending class order.
    """
    check_same_grid(image, label)
    if class_ids is None:
        values = np.unique(np.asarray(label.array))
        class_ids = [v for v in values.tolist() if v != 0]
    ids = sorted({_as_class_id(c) for c in class_ids})
    can = _canonical_image(image, spacing)
    can_label = _canonical_label(label, spacing)
    return {c: _build(image, can, can_label, c, crop_size, None, nan_if_undefined) for c in ids}


def paste_back(
    roi_mask: np.ndarray,
    roi_affine_: np.ndarray,
    original_shape: Sequence[int],
    original_affine: np.ndarray,
) -> np.ndarray:
    """The original ``data_postprocess``: nearest-neighbour ROI mask onto the original grid.

    Args:
      roi_mask: ``(A0, A1, A2)`` binary ROI prediction.
      roi_affine_: (4, 4) RAS affine of the ROI grid.
      original_shape: ``(i, j, k)`` shape of the input image.
      original_affine: (4, 4) RAS affine of the input image.

    Returns:
      uint8 array of ``original_shape`` in ``(i, j, k)`` order; 0 where the original voxel
      maps outside the ROI.
    """
    mask = np.asarray(roi_mask).astype(np.uint8)
    return resample_to_grid(mask, roi_affine_, original_shape, original_affine, "nearest")


def _paste_back_reference(
    roi_mask: np.ndarray,
    roi_affine_: np.ndarray,
    original_shape: Sequence[int],
    original_affine: np.ndarray,
) -> np.ndarray:
    """:func:`paste_back` computed over every voxel of the original grid (test reference)."""
    mask = np.asarray(roi_mask).astype(np.uint8)
    return _resample_to_grid_reference(
        mask, roi_affine_, original_shape, original_affine, "nearest"
    )


def merge_class_masks(masks: dict[int, np.ndarray]) -> np.ndarray:
    """Merge per-class binary masks into one uint8 label map, ascending class order.

    Later (higher) class ids overwrite earlier ones where masks overlap, as the original
    entry point does.
    """
    if not masks:
        raise ValueError("no masks to merge")
    ids = sorted(masks)
    if ids[0] < 1 or ids[-1] > 255:
        raise ValueError(f"class ids must lie in 1..255 for a uint8 map, got {ids}")
    out = np.zeros(np.shape(masks[ids[0]]), dtype=np.uint8)
    for c in ids:
        out[np.asarray(masks[c]) == 1] = c
    return out


# --------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``(..., 3)`` → RAS millimetres ``(..., 3)``."""
    return nib_affines.apply_affine(
        np.asarray(affine, dtype=np.float64), np.asarray(ijk, dtype=np.float64)
    )


def world_to_voxel(affine: np.ndarray, xyz_mm: np.ndarray) -> np.ndarray:
    """RAS millimetres ``(..., 3)`` → continuous voxel indices ``(..., 3)``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return nib_affines.apply_affine(inv, np.asarray(xyz_mm, dtype=np.float64))


def original_voxel_to_roi(
    ijk: np.ndarray, original_affine: np.ndarray, roi_affine_: np.ndarray
) -> np.ndarray:
    """Voxel indices ``(i, j, k)`` of the original file → ROI indices ``(A0, A1, A2)``."""
    return world_to_voxel(roi_affine_, voxel_to_world(original_affine, ijk))


def roi_to_original_voxel(
    a012: np.ndarray, roi_affine_: np.ndarray, original_affine: np.ndarray
) -> np.ndarray:
    """ROI indices ``(A0, A1, A2)`` → continuous voxel indices ``(i, j, k)`` of the file."""
    return world_to_voxel(original_affine, voxel_to_world(roi_affine_, a012))
