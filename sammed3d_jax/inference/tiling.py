"""Sliding-window segmentation of targets larger than one ``S³`` ROI.

Windows are ``S³`` boxes on the canonical grid (RAS+, ``(A0, A1, A2)``, 1.5 mm by default)
placed on a lattice with step ``S / 2`` (50 % overlap) anchored at the click ROI:

1. The first window is the click ROI (:func:`crop_start_for_points`).
2. Each window is decoded with the user clicks that fall inside it. A window without user
   clicks gets one positive click at the foreground voxel of the current fused mask nearest
   to the window centre (ties: first in C order); a window whose region holds no fused
   foreground is skipped.
3. Window logits are fused by weighted averaging on the canonical grid: every window carries
   the separable weight ``w(t) = max(sin²(π (t + ½) / S), 10⁻³)`` per axis (largest at the
   centre, small but positive at the border), and the fused logit is
   ``Σ w·logit / Σ w`` where at least one window covers the voxel (``-inf`` elsewhere). The
   fused mask is ``logit > 0`` (sigmoid > 0.5). The fusion also covers a ``border``-voxel
   band around the grid (the windows' zero padding there), so that, as when one ROI is
   pasted back, the original voxels just outside the resampled grid still get a prediction.
4. After each round the fused mask is inspected on the six faces of every window: where
   foreground touches a face that is not on the volume border, the neighbour window half a
   window further along that axis is queued. Rounds repeat until no window is added or
   ``max_windows`` windows have been decoded.

The decode step is a callable ``window_fn(start, points, labels) -> (S, S, S) logits``
(``start``: canonical window start, ``points``: ``(K, 3)`` window coordinates, ``labels``:
``(K,)``), so a model, a cached predictor or a label-derived oracle (:func:`label_oracle`)
can be plugged in. It may return None for a window it cannot predict (an ROI that cannot be
normalised, e.g. air only): that window adds nothing and is listed as skipped.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from sammed3d_jax.data.geometry import crop_or_pad
from sammed3d_jax.model.common import upsample_logits

__all__ = [
    "TilingResult",
    "Window",
    "WindowFn",
    "crop_start_for_points",
    "label_oracle",
    "tiled_segmentation",
    "window_weights",
]

WindowFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

_WEIGHT_FLOOR = 1e-3


def crop_start_for_points(
    canonical_points: np.ndarray, labels: np.ndarray, shape: Sequence[int], crop_size: int
) -> np.ndarray:
    """ROI start around clicks: the original's bounding-box crop rule applied to the clicks.

    The clicks are rounded to canonical voxels (clipped to the grid) and the box
    ``[lo, hi)`` of the positive ones (all of them when none is positive) gives
    ``start = floor((lo + hi − S) / 2)``, so a single click lands at ROI index ``S / 2``.
    When that box is wider than ``S`` on some axis, the ROI is centred on the last click
    instead, so the newest click is always inside.

    Args:
      canonical_points: ``(N, 3)`` continuous canonical coordinates, in click order.
      labels: ``(N,)`` 1 / 0.
      shape: canonical grid shape.
      crop_size: ROI side ``S``.

    Returns:
      ``(3,)`` int64 ROI start on the canonical grid (negative = padding).
    """
    pts = np.asarray(canonical_points, dtype=np.float64).reshape(-1, 3)
    labs = np.asarray(labels).reshape(-1)
    if pts.shape[0] == 0:
        raise ValueError("need at least one click to place the ROI")
    vox = np.floor(pts + 0.5).astype(np.int64)
    vox = np.clip(vox, 0, np.asarray(shape, dtype=np.int64) - 1)
    chosen = vox[labs == 1] if np.any(labs == 1) else vox
    lo = chosen.min(axis=0)
    hi = chosen.max(axis=0) + 1
    if np.any(hi - lo > int(crop_size)):
        lo, hi = vox[-1], vox[-1] + 1
    return (lo + hi - int(crop_size)) // 2


def window_weights(size: int) -> np.ndarray:
    """``(size, size, size)`` float32 fusion weight of one window (see the module doc)."""
    t = (np.arange(size, dtype=np.float64) + 0.5) / size
    w = np.maximum(np.sin(np.pi * t) ** 2, _WEIGHT_FLOOR)
    return (w[:, None, None] * w[None, :, None] * w[None, None, :]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Window:
    """One decoded window.

    Attributes:
      start: canonical start ``(A0, A1, A2)`` (may be negative: padding).
      points: ``(K, 3)`` float64 clicks in window coordinates given to ``window_fn``.
      labels: ``(K,)`` int64 their labels.
      auto_click: True when a positive click came from the fused mask (the window holds no
        positive click of the user's; its negative clicks are kept).
    """

    start: tuple[int, int, int]
    points: np.ndarray
    labels: np.ndarray
    auto_click: bool


@dataclasses.dataclass(frozen=True)
class TilingResult:
    """Fused sliding-window result on the canonical grid.

    Attributes:
      logits: ``(A0, A1, A2)`` float32 fused logits; ``-inf`` where no window was decoded.
      mask: ``(A0, A1, A2)`` uint8 ``logits > 0``.
      first_window_mask: ``(A0, A1, A2)`` uint8 mask of the first (click) window alone.
      windows: the decoded windows in decoding order.
      reached_max_windows: True when growth stopped at ``max_windows``.
      skipped_windows: starts of the windows ``window_fn`` returned None for.
      border: width of the band around the grid that ``padded_mask`` adds per side.
      padded_mask: ``(A0 + 2b, A1 + 2b, A2 + 2b)`` uint8 fused mask on the grid extended by
        ``b = border`` voxels per side (its voxel ``b`` is the grid's voxel 0).
    """

    logits: np.ndarray
    mask: np.ndarray
    first_window_mask: np.ndarray
    windows: tuple[Window, ...]
    reached_max_windows: bool
    skipped_windows: tuple[tuple[int, int, int], ...] = ()
    border: int = 0
    padded_mask: np.ndarray | None = None


def _overlap(start: np.ndarray, size: int, shape: np.ndarray) -> tuple[tuple, tuple] | None:
    """(volume slices, window slices) of a window's intersection with the grid, or None."""
    vol, win = [], []
    for a in range(3):
        lo = max(int(start[a]), 0)
        hi = min(int(start[a]) + size, int(shape[a]))
        if hi <= lo:
            return None
        vol.append(slice(lo, hi))
        win.append(slice(lo - int(start[a]), hi - int(start[a])))
    return tuple(vol), tuple(win)


def _touching_faces(
    mask: np.ndarray, start: np.ndarray, size: int, shape: np.ndarray
) -> list[tuple[int, int]]:
    """``(axis, ±1)`` faces of the window where the mask is foreground (volume border excluded)."""
    box = _overlap(start, size, shape)
    if box is None:
        return []
    vol, _ = box
    faces = []
    for a in range(3):
        for side, plane in ((-1, int(start[a])), (1, int(start[a]) + size - 1)):
            if plane <= 0 or plane >= int(shape[a]) - 1:
                continue  # on or beyond the volume border: nothing to grow into
            sl = list(vol)
            sl[a] = slice(plane, plane + 1)
            if mask[tuple(sl)].any():
                faces.append((a, side))
    return faces


def tiled_segmentation(
    canonical_shape: Sequence[int],
    points: np.ndarray,
    labels: np.ndarray,
    window_fn: WindowFn,
    *,
    crop_size: int = 128,
    max_windows: int = 27,
    first_start: Sequence[int] | None = None,
    border: int = 2,
) -> TilingResult:
    """Segment with overlapping ``crop_size³`` windows that follow the target.

    Windows grow from the first one across every face the fused foreground touches; a
    positive click that no window holds once that growth stops (a second target, or one
    part of a target the first did not reach) seeds a window of its own, and growth goes
    on from there, until every positive click is in a window or ``max_windows`` is reached.

    Args:
      canonical_shape: shape of the canonical grid.
      points: ``(N, 3)`` user clicks in continuous canonical coordinates.
      labels: ``(N,)`` 1 foreground / 0 background.
      window_fn: decode step ``(start (3,) int64, points (K, 3), labels (K,)) -> (S, S, S)``
        logits of the window.
      crop_size: window side ``S`` (even).
      max_windows: most windows to decode (≥ 1).
      first_start: start of the first window; default :func:`crop_start_for_points`.
      border: voxels per side of the band around the grid that the fusion also covers
        (``TilingResult.padded_mask``); window placement looks at the grid only.

    Returns:
      A :class:`TilingResult`.
    """
    shape = np.asarray(canonical_shape, dtype=np.int64)
    s = int(crop_size)
    if s < 2 or s % 2:
        raise ValueError(f"crop_size must be an even number >= 2, got {crop_size}")
    if isinstance(max_windows, bool) or not isinstance(max_windows, (int, np.integer)):
        raise ValueError(f"max_windows must be an integer >= 1, got {max_windows!r}")
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    labs = np.asarray(labels).reshape(-1).astype(np.int64)
    if first_start is None:
        first = crop_start_for_points(pts, labs, shape, s)
    else:
        first = np.asarray(first_start, dtype=np.int64)
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    step = s // 2
    weight = window_weights(s)
    b = int(border)
    # Accumulated on the grid plus the border band; `inner` is the grid itself.
    padded = shape + 2 * b
    num_all = np.zeros(tuple(padded), np.float32)
    den_all = np.zeros(tuple(padded), np.float32)
    inner = tuple(slice(b, b + int(n)) for n in shape)
    num, den = num_all[inner], den_all[inner]  # views
    first_mask = np.zeros(tuple(shape), np.uint8)
    windows: list[Window] = []
    skipped: list[tuple[int, int, int]] = []
    queued = {tuple(int(v) for v in first)}
    pending: collections.deque[np.ndarray] = collections.deque([first])
    reached_max = False
    centre = np.full(3, (s - 1) / 2.0)

    def _grow() -> None:
        nonlocal reached_max
        while pending and not reached_max:
            for _ in range(len(pending)):
                start = pending.popleft()
                if len(windows) >= max_windows:
                    reached_max = True
                    break
                box = _overlap(start, s, shape)
                if box is None:
                    continue
                vol, win = box
                local = pts - start
                inside = np.all((local >= -0.5) & (local < s - 0.5), axis=1)
                auto = False
                w_pts, w_labs = local[inside], labs[inside]
                if not (w_labs == 1).any():
                    # No positive click of the user's here: one from the fused mask, next to
                    # the window's negative clicks (alone, those would decode an empty window
                    # that pulls its neighbours' logits down where they overlap).
                    d = den[vol]
                    fused = np.zeros(d.shape, bool)
                    np.greater(num[vol], 0, out=fused, where=d > 0)
                    fg = np.argwhere(fused)
                    if fg.size == 0 and not inside.any():
                        continue
                    if fg.size:
                        fg_win = fg + np.array([w.start for w in win])
                        nearest = fg_win[np.argmin(np.sum((fg_win - centre) ** 2, axis=1))]
                        w_pts = np.concatenate([nearest[None].astype(np.float64), w_pts])
                        w_labs = np.concatenate([np.ones(1, np.int64), w_labs])
                        auto = True
                decoded = window_fn(np.array(start), w_pts, w_labs)
                if decoded is None:
                    skipped.append(tuple(int(v) for v in start))
                    continue
                logits = np.asarray(decoded, dtype=np.float32)
                if logits.shape != (s, s, s):
                    raise ValueError(
                        f"window_fn returned shape {logits.shape}, expected {(s,) * 3}"
                    )
                pvol, pwin = _overlap(start + b, s, padded)
                num_all[pvol] += weight[pwin] * logits[pwin]
                den_all[pvol] += weight[pwin]
                if not windows:
                    first_mask[vol] = (logits[win] > 0).astype(np.uint8)
                windows.append(Window(tuple(int(v) for v in start), w_pts, w_labs, auto))
            if reached_max:
                break
            mask = np.zeros(tuple(shape), bool)
            np.greater(num, 0, out=mask, where=den > 0)
            for w in windows:
                st = np.asarray(w.start, dtype=np.int64)
                for axis, side in _touching_faces(mask, st, s, shape):
                    nb = st.copy()
                    nb[axis] += side * step
                    key = tuple(int(v) for v in nb)
                    if key in queued or _overlap(nb, s, shape) is None:
                        continue
                    queued.add(key)
                    pending.append(nb)
            if pending and len(windows) >= max_windows:
                reached_max = True

    positive = np.flatnonzero(labs == 1)
    while True:
        _grow()
        if reached_max:
            break
        # A positive click that no window holds (the target, or targets, it marks are not
        # connected to the windows so far): seed a window centred on it and grow again.
        tried = [np.asarray(w.start) for w in windows] + [np.asarray(t) for t in skipped]
        unreached = [
            i
            for i in positive
            if not any(np.all((pts[i] - t >= -0.5) & (pts[i] - t < s - 0.5)) for t in tried)
        ]
        if not unreached:
            break
        seed = crop_start_for_points(pts[unreached[:1]], labs[unreached[:1]], shape, s)
        key = tuple(int(v) for v in seed)
        if key in queued:  # already tried (outside the grid): nothing more to place
            break
        if len(windows) >= max_windows:
            reached_max = True
            break
        queued.add(key)
        pending.append(seed)

    logits_all = np.full(tuple(padded), -np.inf, np.float32)
    np.divide(num_all, den_all, out=logits_all, where=den_all > 0)
    padded_mask = (logits_all > 0).astype(np.uint8)
    logits = np.ascontiguousarray(logits_all[inner])
    mask = np.ascontiguousarray(padded_mask[inner])
    return TilingResult(
        logits, mask, first_mask, tuple(windows), reached_max, tuple(skipped), b, padded_mask
    )


def label_oracle(canonical_label: np.ndarray, crop_size: int = 128) -> WindowFn:
    """A stand-in decode step derived from a label, like the synthetic predictor of the goldens.

    For a window at ``start`` the low-res logits are ``10 · (avgpool4(label crop) − 0.5)``
    (``crop_size / 4`` per side), upsampled trilinearly to ``crop_size³``. Clicks are
    ignored. Useful to test the geometry of tiling without a trained model.

    Args:
      canonical_label: ``(A0, A1, A2)`` binary label on the canonical grid.
      crop_size: window side ``S`` (a multiple of 4).
    """
    label = (np.asarray(canonical_label) > 0).astype(np.float32)
    s = int(crop_size)
    if s % 4:
        raise ValueError(f"crop_size must be a multiple of 4, got {crop_size}")
    q = s // 4

    def window_fn(start: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        crop = crop_or_pad(label, start, s)
        pooled = crop.reshape(q, 4, q, 4, q, 4).mean(axis=(1, 3, 5))
        low = (np.float32(10.0) * (pooled - np.float32(0.5))).astype(np.float32)
        return np.asarray(upsample_logits(low, s))

    return window_fn
