"""PNG overlay: three orthogonal slices through a click with the mask and the clicks drawn.

The image is shown in RAS+ orientation without resampling (axes permuted and flipped like
:func:`sammed3d_jax.data.to_canonical`, pixel aspect from the voxel spacing): an axial slice
(left-right horizontal, posterior at the bottom), a coronal slice (left-right horizontal,
inferior at the bottom) and a sagittal slice (posterior-anterior horizontal, inferior at the
bottom). Positive clicks are green ``+``, negative clicks red ``x``; a click is drawn filled
on the slice that contains it and as a faint outline on the others.
Rendering uses matplotlib's Agg canvas directly, so no display or global backend is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sammed3d_jax.data.geometry import to_canonical
from sammed3d_jax.files import atomic_path

__all__ = ["canonical_voxel_index", "plain_text", "save_overlay_png"]


def plain_text(text: str) -> str:
    """`text` (a file or class name) as matplotlib shows it literally: "$" escaped (an even
    number of them starts mathtext, whose parser rejects most names), bytes that are not
    UTF-8 (a file name's, kept by Python as surrogates) shown as U+FFFD, and a leading "_"
    (which hides a legend entry) behind a zero-width space."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = text.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def canonical_voxel_index(points: np.ndarray, axis_map: Sequence) -> np.ndarray:
    """Map ``(N, 3)`` voxel indices of a file to the index of its RAS+ re-oriented array."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.empty_like(pts)
    for a, m in enumerate(axis_map):
        v = pts[:, m.source_axis]
        out[:, a] = (m.source_len - 1) - v if m.reversed else v
    return out


def _window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def save_overlay_png(
    path: str | os.PathLike,
    image: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write a PNG with three orthogonal slices through the first click.

    Args:
      path: destination ``.png`` (written to a temporary name, then renamed).
      image: ``(i, j, k)`` image on the original grid.
      affine: its (4, 4) RAS affine.
      mask: ``(i, j, k)`` binary mask on the same grid.
      points: ``(N, 3)`` clicks in voxel indices ``(i, j, k)``; the slices go through the
        first one.
      labels: ``(N,)`` 1 / 0.
      title: optional figure title.
      dpi: resolution.

    Returns:
      The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    dst = Path(path)
    if dst.suffix.lower() != ".png":
        raise ValueError(f"{dst}: overlay name must end in .png")
    try:
        img = np.asarray(image, dtype=np.float32)
        raw_pts = np.asarray(points, dtype=np.float64)
        labs = np.asarray(labels).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{dst}: image, points and labels must be arrays: {e}") from e
    if img.ndim != 3:
        raise ValueError(f"{dst}: expected a 3D image array, got shape {img.shape}")
    if np.shape(mask) != img.shape:
        raise ValueError(f"mask shape {np.shape(mask)} != image shape {img.shape}")
    if raw_pts.ndim != 2 or raw_pts.shape[1] != 3 or raw_pts.shape[0] == 0:
        raise ValueError(f"{dst}: points must be (N, 3) voxel indices, N >= 1, got {raw_pts.shape}")
    if not np.isfinite(raw_pts).all():
        raise ValueError(f"{dst}: points must be finite")
    if labs.shape != (raw_pts.shape[0],) or not np.isin(labs, (0, 1)).all():
        raise ValueError(f"{dst}: labels must be one 0 or 1 per point, got {labs.tolist()}")
    can_img, can_aff, axis_map = to_canonical(img, affine)
    can_mask = to_canonical(np.asarray(mask) > 0, affine)[0]
    spacing = np.sqrt(np.sum(np.asarray(can_aff)[:3, :3] ** 2, axis=0))
    pts = canonical_voxel_index(raw_pts, axis_map)
    centre = np.clip(np.floor(pts[0] + 0.5).astype(int), 0, np.array(can_img.shape) - 1)
    vmin, vmax = _window(can_img)
    red = ListedColormap([(1.0, 0.15, 0.1, 1.0)])

    # (name, fixed canonical axis, horizontal axis, vertical axis)
    views = [("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2)]
    widths = [can_img.shape[h] * spacing[h] for _, _, h, _ in views]
    fig = Figure(figsize=(4.0 * 3, 4.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    for ax, (name, fixed, h, v) in zip(axes, views):
        index = [slice(None)] * 3
        index[fixed] = int(centre[fixed])
        sl = can_img[tuple(index)]
        ms = can_mask[tuple(index)]
        # The two remaining axes keep ascending order (h < v in every view): rows of the
        # transposed slice run along v, columns along h.
        ax.imshow(
            sl.T,
            cmap="gray",
            vmin=vmin,
            vmax=vmax,
            origin="lower",
            aspect=spacing[v] / spacing[h],
            interpolation="nearest",
        )
        if ms.any():
            ax.imshow(
                np.ma.masked_where(~ms.T, ms.T.astype(np.float32)),
                cmap=red,
                alpha=0.45,
                origin="lower",
                aspect=spacing[v] / spacing[h],
                interpolation="nearest",
            )
        for p, lab in zip(pts, labs):
            on_slice = abs(p[fixed] - centre[fixed]) <= 0.5
            colour = "lime" if lab == 1 else "red"
            marker = "+" if lab == 1 else "x"
            ax.plot(
                p[h],
                p[v],
                marker=marker,
                color=colour,
                markersize=12 if on_slice else 8,
                markeredgewidth=2.5 if on_slice else 1.0,
                alpha=1.0 if on_slice else 0.5,
                linestyle="none",
            )
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(plain_text(title), fontsize=10)
    fig.tight_layout()
    with atomic_path(dst, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return dst
