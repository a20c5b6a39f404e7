"""Interactive SAM-Med3D inference without ground truth.

The pipeline for one image (all arrays after resampling are on the canonical grid, indexed
``(A0, A1, A2)`` = RAS+ at ``spacing`` mm, see :mod:`sammed3d_jax.data`):

1. :meth:`Predictor.set_image` resamples the image once (linear, like the original's
   ``tio.Resample``) and re-orients it to RAS+; the original grid is kept for paste-back.
2. :meth:`Predictor.predict` takes clicks in voxel indices ``(i, j, k)`` of the original
   file (or RAS millimetres with ``mm=True``), maps them to continuous canonical
   coordinates, and chooses the ``S³`` ROI (``S`` = the model's ``img_size``):

   * on first use (or after :meth:`Predictor.reset`) the ROI is centred on the bounding box
     of the positive clicks, rounded to canonical voxels, with the original's crop rule
     ``start = floor((lo + hi − S) / 2)`` (a single click lands at ROI index ``S / 2``);
     without a positive click the box of all clicks is used, and when the box is wider than
     ``S`` the ROI is centred on the last click instead
     (:func:`sammed3d_jax.inference.tiling.crop_start_for_points`);
   * later calls keep the current ROI while every new click (one not given in the previous
     call) lies inside it; a new click outside triggers a new crop by the same rule (and a
     new encoding). A click that fell outside earlier does not force a new crop at every
     later call. The previous low-res logits
     belong to the old ROI and are then dropped: the mask prompt starts again from zeros;
   * clicks that still fall outside the chosen ROI (positive clicks spanning more than ``S``
     voxels) are kept in the result but not given to the model (``Prediction.in_roi``);
     use tiling (:meth:`Predictor.predict_tiled`) for such targets.

3. The ROI is cut out (zero padding outside the volume) and z-normalised alone with the
   statistics of its voxels > 0, as the original's inference does; it is encoded once and the
   embedding is cached per ROI (LRU).
4. The clicks, in continuous ROI coordinates, are decoded together with the previous
   low-res logits as mask prompt (zeros when there are none), the logits are upsampled
   trilinearly (``align_corners=False``) to ``S³`` and thresholded at sigmoid > 0.5, and the
   binary ROI mask is pasted back onto the original grid with nearest-neighbour resampling.

Compilation: the encoder and decoder are ``jax.jit``-compiled once per architecture and
process (the graph definition is a static argument). Click arrays are padded to a bucket of
:func:`point_bucket` slots (powers of two, at least 4) with a ``point_mask`` that makes
unused slots exactly inert, so the 1st to 4th click share one compilation, the 5th to 8th
another, and so on.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sammed3d_jax.data.geometry import (
    crop_or_pad,
    paste_back,
    resample_to_spacing,
    resampled_grid,
    roi_affine,
    to_canonical,
    voxel_to_world,
    world_to_voxel,
    znormalize,
)
from sammed3d_jax.data.nifti import Volume, VolumeError, check_affine, load_volume
from sammed3d_jax.inference.tiling import TilingResult, crop_start_for_points, tiled_segmentation
from sammed3d_jax.model.common import upsample_logits
from sammed3d_jax.model.sam import FlatDef, Sam3D, compute_dtype_weights, merge_flat, split_flat

__all__ = [
    "MIN_POINT_BUCKET",
    "DecodeOutput",
    "NoClickInRoiError",
    "Prediction",
    "Predictor",
    "PredictorError",
    "RoiNormalizationError",
    "SamEngine",
    "TiledPrediction",
    "check_clicks",
    "crop_start_for_points",
    "point_bucket",
    "trace_counts",
]

#: Smallest number of point slots a decoder call is compiled for.
MIN_POINT_BUCKET = 4

DEFAULT_SPACING = (1.5, 1.5, 1.5)

# How often each jitted function has been traced (compiled) in this process.
_TRACES: collections.Counter[str] = collections.Counter()


class PredictorError(ValueError):
    """Clicks or images the predictor cannot use; the message names the problem."""


class NoClickInRoiError(PredictorError):
    """None of the clicks lies inside the ROI chosen for them (they span more than ``S``)."""


class RoiNormalizationError(PredictorError):
    """The ROI has fewer than two voxels > 0, so its z-normalisation is undefined."""


def trace_counts() -> dict[str, int]:
    """Number of traces (= compilations) of the jitted encoder and decoder so far."""
    return {"encode": _TRACES["encode"], "decode": _TRACES["decode"]}


def point_bucket(n: int, minimum: int = MIN_POINT_BUCKET) -> int:
    """Number of point slots for ``n`` clicks: the smallest power of two ``>= max(n, minimum)``."""
    if n < 0:
        raise ValueError(f"number of points must be >= 0, got {n}")
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    return size


def _encode_impl(flatdef: FlatDef, leaves: list, volumes: jax.Array) -> jax.Array:
    _TRACES["encode"] += 1
    return merge_flat(flatdef, leaves).encode(volumes)


def _decode_impl(
    flatdef: FlatDef,
    leaves: list,
    embedding: jax.Array,
    points: jax.Array,
    labels: jax.Array,
    mask_input: jax.Array,
    point_mask: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    _TRACES["decode"] += 1
    model = merge_flat(flatdef, leaves)
    out = model.decode(embedding, points, labels, mask_input, point_mask=point_mask)
    low = out.low_res_logits[:, 0]  # (1, L, L, L)
    logits = upsample_logits(low, model.config.img_size)[0]  # (S, S, S)
    return low[0], logits, jax.nn.sigmoid(logits)


_encode_jit = jax.jit(_encode_impl, static_argnums=0)
_decode_jit = jax.jit(_decode_impl, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """One decoder call on one ROI.

    Attributes:
      low_res_logits: (L, L, L) float32 raw logits (the next call's mask prompt).
      logits: (S, S, S) float32 logits upsampled trilinearly (``align_corners=False``).
      probability: (S, S, S) float32 ``sigmoid(logits)``; the mask is ``probability > 0.5``.
    """

    low_res_logits: np.ndarray
    logits: np.ndarray
    probability: np.ndarray


class SamEngine:
    """Jit-compiled encode/decode of one :class:`Sam3D` for one volume at a time.

    Args:
      model: the model; its weights are captured when the engine is built.

    Attributes:
      crop_size: ``S``, the model's input side.
      low_res_size: ``L``, the low-res logits side.
      encode_calls, decode_calls: number of calls so far.
      encode_seconds, decode_seconds: wall time spent in them (results on the host).
    """

    def __init__(self, model: Sam3D):
        if not isinstance(model, Sam3D):
            raise TypeError(f"expected a Sam3D model, got {type(model).__name__}")
        self.model = model
        self.config = model.config
        # Weights as a flat list: the cheapest argument for a jitted call (see split_flat),
        # in the dtype the layers compute in (cast once here rather than in every call).
        self._flatdef, self._leaves = split_flat(compute_dtype_weights(model))
        self.crop_size = int(self.config.img_size)
        self.low_res_size = int(self.config.low_res_size)
        self.encode_calls = 0
        self.decode_calls = 0
        self.encode_seconds = 0.0
        self.decode_seconds = 0.0

    def encode(self, roi_image: np.ndarray) -> jax.Array:
        """Image embedding ``(1, g, g, g, C)`` of a z-normalised ``(S, S, S)`` ROI."""
        s = self.crop_size
        x = np.asarray(roi_image, dtype=np.float32)
        if x.shape != (s, s, s):
            raise ValueError(f"roi_image must have shape {(s, s, s)}, got {x.shape}")
        t0 = time.perf_counter()
        emb = _encode_jit(self._flatdef, self._leaves, jnp.asarray(x[None]))
        emb.block_until_ready()
        self.encode_seconds += time.perf_counter() - t0
        self.encode_calls += 1
        return emb

    def decode(
        self,
        embedding: jax.Array,
        points: np.ndarray,
        labels: np.ndarray,
        mask_input: np.ndarray | None = None,
    ) -> DecodeOutput:
        """Decode clicks on one ROI.

        Args:
          embedding: ``(1, g, g, g, C)`` from :meth:`encode`.
          points: ``(N, 3)`` float ROI voxel coordinates (A0, A1, A2); N may be 0.
          labels: ``(N,)`` 1 (foreground) or 0 (background).
          mask_input: ``(L, L, L)`` previous low-res logits, or None for zeros (the
            original's first interaction).

        Returns:
          A :class:`DecodeOutput` with host arrays.
        """
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
        labs = np.asarray(labels).reshape(-1)
        n = pts.shape[0]
        if labs.shape[0] != n:
            raise ValueError(f"{n} points but {labs.shape[0]} labels")
        bucket = point_bucket(n)
        p = np.zeros((1, bucket, 3), np.float32)
        lab = np.full((1, bucket), -1, np.int32)
        valid = np.zeros((1, bucket), bool)
        p[0, :n] = pts
        lab[0, :n] = labs.astype(np.int32)
        valid[0, :n] = True
        size = self.low_res_size
        if mask_input is None:
            m = np.zeros((1, size, size, size), np.float32)
        else:
            m = np.asarray(mask_input, dtype=np.float32).reshape(1, size, size, size)
        t0 = time.perf_counter()
        inputs = jax.device_put((p, lab, m, valid))  # one batched transfer, not four
        low, logits, prob = _decode_jit(self._flatdef, self._leaves, embedding, *inputs)
        out = DecodeOutput(np.asarray(low), np.asarray(logits), np.asarray(prob))
        self.decode_seconds += time.perf_counter() - t0
        self.decode_calls += 1
        return out


# --------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Result of one :meth:`Predictor.predict` call.

    Attributes:
      mask: ``(i, j, k)`` uint8 0/1 mask on the original image grid.
      roi_mask: ``(S, S, S)`` uint8 0/1 ROI mask (sigmoid > 0.5), axes A0, A1, A2.
      roi_probability: ``(S, S, S)`` float32 sigmoid of the upsampled logits.
      low_res_logits: ``(L, L, L)`` float32; pass back as ``previous_logits``.
      roi_start: ``(3,)`` int64 ROI start on the canonical grid (negative = padding).
      roi_affine: ``(4, 4)`` RAS affine of the ROI grid.
      points_roi: ``(N, 3)`` float64 every click in continuous ROI coordinates.
      labels: ``(N,)`` int64 click labels.
      in_roi: ``(N,)`` bool, the clicks that were given to the model.
      encoded: True when this call had to encode its ROI (not found in the cache).
      mask_prompt_reset: True when previous logits were given but dropped because the ROI
        changed.
      image_token: identifies the image (the `set_image` call) it was made for: a
        Prediction is only accepted as ``previous_logits`` for the same one.
    """

    mask: np.ndarray
    roi_mask: np.ndarray
    roi_probability: np.ndarray
    low_res_logits: np.ndarray
    roi_start: np.ndarray
    roi_affine: np.ndarray
    points_roi: np.ndarray
    labels: np.ndarray
    in_roi: np.ndarray
    encoded: bool
    mask_prompt_reset: bool
    image_token: object = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class TiledPrediction:
    """Result of :meth:`Predictor.predict_tiled`.

    Attributes:
      mask: ``(i, j, k)`` uint8 0/1 mask on the original image grid.
      tiling: the fused canonical-grid result (logits, mask, windows).
    """

    mask: np.ndarray
    tiling: TilingResult


def _inside_roi(points_roi: np.ndarray, size: int) -> np.ndarray:
    """Which continuous ROI coordinates round to a voxel of the ``size³`` ROI."""
    return np.all((points_roi >= -0.5) & (points_roi < size - 0.5), axis=-1)


def check_clicks(
    volume: Volume, points: Any, labels: Any, *, mm: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate clicks against an image.

    Args:
      volume: the image the clicks refer to.
      points: ``(N, 3)`` (or ``(3,)`` for one click) voxel indices ``(i, j, k)`` of
        ``volume``, or RAS millimetres with ``mm=True``.
      labels: ``(N,)`` 1 (foreground) or 0 (background).
      mm: interpret ``points`` as millimetres.

    Returns:
      ``(voxels (N, 3), world_mm (N, 3), labels (N,) int64)``.

    Raises:
      PredictorError: wrong shapes, non-finite values, labels other than 0/1, or a click
        whose nearest voxel lies outside the volume.
    """
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PredictorError(f"points must be numbers, got {points!r}") from exc
    if pts.ndim == 1 and pts.shape[0] == 3:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] == 0:
        raise PredictorError(f"points must have shape (N, 3) with N >= 1, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise PredictorError("points contain NaN or inf")
    try:
        labs = np.asarray(labels, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise PredictorError(f"labels must be 0 or 1, got {labels!r}") from exc
    if labs.shape[0] != pts.shape[0]:
        raise PredictorError(f"{pts.shape[0]} points but {labs.shape[0]} labels")
    if not np.all((labs == 0) | (labs == 1)):
        raise PredictorError(f"labels must be 0 (background) or 1 (foreground), got {labs}")
    labs = labs.astype(np.int64)
    if mm:
        world = pts
        voxels = world_to_voxel(volume.affine, world)
    else:
        voxels = pts
        world = voxel_to_world(volume.affine, voxels)
    shape = np.asarray(volume.shape)
    outside = ~np.all((voxels >= -0.5) & (voxels < shape - 0.5), axis=1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        given = tuple(round(float(v), 3) for v in pts[k])
        where = (
            f"{given} mm = voxel {tuple(round(float(v), 2) for v in voxels[k])}"
            if mm
            else f"{given}"
        )
        raise PredictorError(
            f"click {k + 1} at {where} lies outside the image of shape "
            f"{tuple(int(s) for s in shape)} (voxel indices run from 0 to n-1 per axis)"
        )
    return voxels, world, labs


class Predictor:
    """Click-driven SAM-Med3D segmentation of one image at a time (no ground truth).

    Args:
      model: a :class:`Sam3D` (or a :class:`SamEngine` built from one).
      spacing: canonical grid spacing in mm (the original uses 1.5 mm isotropic).
      embedding_cache_size: ROI embeddings kept per image (least recently used dropped).

    Example::

        predictor = Predictor(load_model("ckpt"))
        predictor.set_image("ct.nii.gz")
        first = predictor.predict([[120, 85, 40]], [1])
        second = predictor.predict([[120, 85, 40], [131, 90, 41]], [1, 0], first)
        save_mask("mask.nii.gz", second.mask, predictor.image)
    """

    def __init__(
        self,
        model: Sam3D | SamEngine,
        spacing: Sequence[float] = DEFAULT_SPACING,
        *,
        embedding_cache_size: int = 8,
    ):
        self.engine = model if isinstance(model, SamEngine) else SamEngine(model)
        try:
            spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (3,)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"spacing must be one number or three, got {spacing!r}") from e
        if not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be three positive numbers, got {spacing}")
        self.spacing = spacing
        self.crop_size = self.engine.crop_size
        self.embedding_cache_size = max(1, int(embedding_cache_size))
        self._image: Volume | None = None
        self._canonical: np.ndarray | None = None
        self._canonical_affine: np.ndarray | None = None
        self._cache: collections.OrderedDict[tuple[int, ...], jax.Array] = collections.OrderedDict()
        self._current_start: np.ndarray | None = None
        self._last_points: np.ndarray | None = None  # canonical clicks of the last call
        self._image_token: object | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        spacing: float | Sequence[float] | None = None,
        embedding_cache_size: int = 8,
        **config_overrides: Any,
    ) -> Predictor:
        """A predictor for a checkpoint on the grid its model was trained on.

        ``path``: anything :func:`~sammed3d_jax.checkpoint.load_model` reads (a converted
        checkpoint, a `.pth` file, a `train.py` workdir). ``spacing`` defaults to the one a
        workdir recorded (``data.spacing``), else the released models' 1.5 mm, as the segment
        and evaluate commands choose it. ``config_overrides``: numerics for ``load_model``
        (e.g. ``dtype="bfloat16"``).
        """
        from sammed3d_jax.checkpoint import load_model, recorded_spacing

        model = load_model(path, **config_overrides)
        if spacing is None:
            spacing = recorded_spacing(path) or DEFAULT_SPACING
        return cls(model, spacing=spacing, embedding_cache_size=embedding_cache_size)

    # ---------------------------------------------------------------- image

    def set_image(self, image: Volume | str | os.PathLike) -> None:
        """Load (if a path), resample to ``spacing`` and re-orient the image; clears caches.

        Raises:
          VolumeError: unreadable, non-NIfTI, not 3D or non-finite image (message names
            the file).
        """
        if isinstance(image, Volume):
            vol = image
            check_affine(vol.affine, vol.path)
            # In-memory volumes as the file reader makes them: arrays, float64 affine.
            vol = dataclasses.replace(
                vol, array=np.asarray(vol.array), affine=np.asarray(vol.affine, np.float64)
            )
        elif isinstance(image, (str, os.PathLike)):
            vol = load_volume(Path(image), kind="image")
        else:
            raise PredictorError(
                f"image must be a NIfTI file path or a Volume(array, affine), got "
                f"{type(image).__name__}; wrap an array as Volume(array, affine)"
            )
        array = vol.array
        name = vol.path or "<image>"
        if array.ndim != 3:
            raise VolumeError(f"{name}: expected a 3D volume, got shape {array.shape}")
        real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        if not (real or array.dtype == np.bool_):
            raise VolumeError(f"{name}: unsupported voxel type {array.dtype} (real values needed)")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise VolumeError(f"{name}: the image has non-finite (NaN/inf) voxels")
        try:  # a volume thinner than one voxel, or a grid too large for the spacing
            resampled_grid(array.shape, vol.affine, self.spacing)
        except ValueError as e:
            raise VolumeError(f"{name}: {e}") from e
        resampled, res_affine = resample_to_spacing(array, vol.affine, self.spacing, "linear")
        canonical, can_affine, _ = to_canonical(resampled, res_affine)
        self._image = vol
        self._image_token = object()  # marks the Predictions of this image
        self._canonical = canonical
        self._canonical_affine = can_affine
        self._cache.clear()
        self._current_start = None
        self._last_points = None

    @property
    def image(self) -> Volume:
        """The current image on its original grid."""
        if self._image is None:
            raise PredictorError("no image set; call set_image() first")
        return self._image

    @property
    def canonical_image(self) -> np.ndarray:
        """The resampled RAS+ image ``(A0, A1, A2)`` in the file's dtype."""
        self.image  # noqa: B018 - raises without an image
        return self._canonical

    @property
    def canonical_affine(self) -> np.ndarray:
        """(4, 4) RAS affine of the canonical grid."""
        self.image  # noqa: B018
        return self._canonical_affine

    def reset(self) -> None:
        """Forget the current ROI (the next call crops around its clicks); keep embeddings."""
        self._current_start = None
        self._last_points = None

    # ---------------------------------------------------------------- clicks

    def _check_clicks(
        self, points: Any, labels: Any, mm: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate clicks; return (voxel indices (N,3), canonical coords (N,3), labels (N,))."""
        voxels, world, labs = check_clicks(self.image, points, labels, mm=mm)
        return voxels, world_to_voxel(self._canonical_affine, world), labs

    def to_canonical(self, points: Any, *, mm: bool = False) -> np.ndarray:
        """``(N, 3)`` clicks (original voxel indices or mm) → continuous canonical coordinates."""
        try:
            pts = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise PredictorError(f"points must be (N, 3) coordinates: {e}") from e
        if pts.ndim == 1:
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] == 0:
            raise PredictorError(f"points must be (N, 3) coordinates, got shape {pts.shape}")
        return self._check_clicks(pts, np.ones(pts.shape[0]), mm)[1]

    # ---------------------------------------------------------------- ROI

    def _embedding(self, start: np.ndarray) -> tuple[jax.Array, bool]:
        key = tuple(int(v) for v in start)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key], False
        raw = crop_or_pad(self._canonical, start, self.crop_size)
        try:
            roi, _, _ = znormalize(raw)
        except ValueError as exc:
            raise RoiNormalizationError(
                f"{self.image.path or '<image>'}: cannot normalise the {self.crop_size}^3 ROI "
                f"at canonical start {list(key)}: {exc}"
            ) from exc
        emb = self.engine.encode(roi)
        self._cache[key] = emb
        while len(self._cache) > self.embedding_cache_size:
            self._cache.popitem(last=False)
        return emb, True

    def window_logits(
        self, start: np.ndarray, points: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        """Upsampled ``(S, S, S)`` logits of the ROI at canonical ``start`` for ROI clicks.

        The decode step of :func:`sammed3d_jax.inference.tiling.tiled_segmentation`
        (encoding cached per ROI, mask prompt zeros).
        """
        emb, _ = self._embedding(np.asarray(start, dtype=np.int64))
        return self.engine.decode(emb, points, labels, None).logits

    # ---------------------------------------------------------------- predict

    def predict(
        self,
        points: Any,
        labels: Any,
        previous_logits: Prediction | np.ndarray | None = None,
        *,
        mm: bool = False,
    ) -> Prediction:
        """Segment from clicks.

        Args:
          points: ``(N, 3)`` clicks: voxel indices ``(i, j, k)`` of the original file
            (fractions allowed), or RAS millimetres with ``mm=True``. Give all clicks so far.
          labels: ``(N,)`` 1 = foreground, 0 = background.
          previous_logits: the previous :class:`Prediction` (its ROI is then the current
            one) or its ``(L, L, L)`` low-res logits (current ROI = the last call's); None
            for a zero mask prompt and an ROI chosen afresh from ``points`` (the same
            call gives the same result whatever came before).
          mm: interpret ``points`` as millimetres.

        Returns:
          A :class:`Prediction`.

        Raises:
          PredictorError: malformed clicks, clicks outside the image, no click inside the
            chosen ROI, or an ROI that cannot be normalised.
        """
        _, canonical, labs = self._check_clicks(points, labels, mm)
        s = self.crop_size
        prev_low = None
        # Without previous logits the call starts afresh: its ROI depends on its clicks only,
        # never on what earlier calls happened to segment.
        current = known = None
        if isinstance(previous_logits, Prediction):
            if previous_logits.image_token is not self._image_token:
                raise PredictorError(
                    "previous_logits is a Prediction of another image (or of another "
                    "Predictor or set_image call); start with previous_logits=None"
                )
            current = previous_logits.roi_start
            prev_low = previous_logits.low_res_logits
            known = previous_logits.points_roi + previous_logits.roi_start
        elif previous_logits is not None:
            try:
                prev_low = np.asarray(previous_logits, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise PredictorError(
                    "previous_logits must be a Prediction or an array of low-res logits, got "
                    f"{type(previous_logits).__name__}"
                ) from e
            if not np.isfinite(prev_low).all():
                raise PredictorError("previous_logits has non-finite (NaN/inf) values")
            size = self.engine.low_res_size
            if prev_low.size != size**3:
                raise PredictorError(
                    f"previous_logits must have {size}^3 values (shape (L, L, L) with L = "
                    f"{size}), got shape {prev_low.shape}"
                )
            prev_low = prev_low.reshape(size, size, size)
            current, known = self._current_start, self._last_points
        # The clicks new since the last call (all of them unless those extend the last
        # call's): only these can move the ROI.
        new = canonical
        if known is not None and len(known) <= len(canonical):
            if np.allclose(canonical[: len(known)], known, rtol=0, atol=1e-9):
                new = canonical[len(known) :]
        start = None
        if current is not None and _inside_roi(new - current, s).all():
            start = np.asarray(current, dtype=np.int64)
        if start is None:
            start = crop_start_for_points(canonical, labs, self._canonical.shape, s)
        reset = prev_low is not None and (
            current is None or not np.array_equal(np.asarray(current), start)
        )
        if reset:
            prev_low = None
        points_roi = canonical - start
        inside = _inside_roi(points_roi, s)
        if not inside.any():
            raise NoClickInRoiError(
                f"no click lies inside the {s}^3 ROI at canonical start {start.tolist()}: the "
                f"positive clicks span more than {s} voxels at {self.spacing[0]} mm; use tiling"
            )
        emb, encoded = self._embedding(start)
        out = self.engine.decode(emb, points_roi[inside], labs[inside], prev_low)
        roi_mask = (out.probability > 0.5).astype(np.uint8)
        aff = roi_affine(self._canonical_affine, start)
        vol = self.image
        mask = paste_back(roi_mask, aff, vol.shape, vol.affine)
        self._current_start = start
        self._last_points = canonical
        return Prediction(
            mask=mask,
            roi_mask=roi_mask,
            roi_probability=out.probability,
            low_res_logits=out.low_res_logits,
            roi_start=start,
            roi_affine=aff,
            points_roi=points_roi,
            labels=labs,
            in_roi=inside,
            encoded=encoded,
            mask_prompt_reset=reset,
            image_token=self._image_token,
        )

    def predict_tiled(
        self,
        points: Any,
        labels: Any,
        *,
        mm: bool = False,
        max_windows: int = 27,
        window_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> TiledPrediction:
        """Segment a target larger than one ROI with overlapping windows.

        See :func:`sammed3d_jax.inference.tiling.tiled_segmentation`; the first window is
        the ROI :meth:`predict` would use. Each window is encoded once (mask prompt zeros).

        Args:
          points, labels, mm: as in :meth:`predict`.
          max_windows: upper bound on the number of windows.
          window_fn: replaces the model's decode step (``(start, points, labels) ->
            (S, S, S)`` logits, or None to skip the window), e.g. for tests. The model's
            step skips windows whose ROI cannot be normalised (``skipped_windows``).

        Returns:
          A :class:`TiledPrediction` with the mask on the original grid.
        """
        _, canonical, labs = self._check_clicks(points, labels, mm)
        failures: list[RoiNormalizationError] = []

        def decode(start: np.ndarray, pts: np.ndarray, labs: np.ndarray) -> np.ndarray | None:
            try:
                return self.window_logits(start, pts, labs)
            except RoiNormalizationError as e:  # e.g. a window in air: skipped
                failures.append(e)
                return None

        result = tiled_segmentation(
            self._canonical.shape,
            canonical,
            labs,
            window_fn or decode,
            crop_size=self.crop_size,
            max_windows=max_windows,
        )
        if not result.windows and failures:  # the clicks' own ROI: as predict() would
            raise failures[0]
        vol = self.image
        # The fused mask with its border band, as one ROI's paste-back covers the original
        # voxels just outside the resampled grid.
        corner = np.full(3, -result.border, np.int64)
        aff = roi_affine(self._canonical_affine, corner)
        mask = paste_back(result.padded_mask, aff, vol.shape, vol.affine)
        return TiledPrediction(mask=mask, tiling=result)
