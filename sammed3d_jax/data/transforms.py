"""Training transforms: small numpy dictionary transforms with MONAI-style names.

A *sample* is a ``dict``; the transforms read and write these keys:

* ``image``: ``(A0, A1, A2)`` volume (file dtype until :class:`StorageDtyped`),
* ``label``: ``(A0, A1, A2)`` uint8 binary target (1 = the item's class),
* ``affine``: (4, 4) float64 RAS affine of the grid both arrays live on,
* ``ct``: whether the item is CT (drives :class:`ClampCTd`),
* ``crop_start``: int64 ``(3,)`` box start of the crop (set by :class:`CropOrPadd`),
* ``original_shape`` / ``original_affine``: the grid of the input files (set by :class:`LoadImaged`).

The training chain follows the original (``ToCanonical`` → ``CropOrPad`` around the label →
``RandomFlip``) with the offline 1.5 mm resampling folded in:

    LoadImaged → Spacingd → Orientationd → CropOrPadd → StorageDtyped   (deterministic: "prepare")
    ClampCTd → RandFlipd                                              (per step: "augment")

The *prepare* half is exactly what :func:`sammed3d_jax.data.preprocess_case` computes for
inference (resample, re-orient, crop around the label's bounding box), so the ROI and label
arrays are identical to the inference ROI for the same case and class. It is also what the
ArrayRecord shards store (:mod:`sammed3d_jax.data.records`), so training from shards and
from NIfTI files gives identical batches. The original clamps CT before the crop; clamping
after it gives the same voxels (the crop only copies voxels and pads with 0, which lies inside
the clamp range), and lets the shards keep the unclamped intensities.

Random transforms (``Rand*``) have a ``prob`` and draw every random number from the
``np.random.Generator`` passed to them, so a sample's augmentation depends only on that
generator (the pipeline seeds one per sample from the run seed and the sample's position).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sammed3d_jax.data.geometry import (
    crop_or_pad,
    crop_start_centered,
    crop_start_from_mask,
    resample_to_spacing,
    roi_affine,
    to_canonical,
)
from sammed3d_jax.data.nifti import Volume, align_to_label, load_volume

__all__ = [
    "CT_RANGE",
    "ClampCTd",
    "Compose",
    "CropOrPadd",
    "LoadImaged",
    "Orientationd",
    "RandFlipd",
    "RandomTransform",
    "Spacingd",
    "StorageDtyped",
    "Transform",
    "augment_transforms",
    "binarize_label",
    "is_ct_name",
    "prepare_case",
    "prepare_transforms",
    "storage_image",
    "to_example",
    "zero_example",
]

Sample = dict[str, Any]
Match = str  # "equal", "nonzero" or "any:<ids>" (a region, see region_match)
ClampMode = Literal["auto", "always", "never"]

CT_RANGE = (-1000.0, 1000.0)
_INT16 = np.iinfo(np.int16)
_CT_NAME_RE = re.compile(r"^ct($|[_\-. ])", re.IGNORECASE)
_NNUNET_PREFIX_RE = re.compile(r"^Dataset\d+_", re.IGNORECASE)


class Transform:
    """A deterministic transform ``sample -> sample``."""

    def __call__(self, data: Sample) -> Sample:
        raise NotImplementedError


class RandomTransform:
    """A random transform ``(sample, rng) -> sample``; all randomness comes from ``rng``."""

    prob: float = 1.0

    def __call__(self, data: Sample, rng: np.random.Generator) -> Sample:
        raise NotImplementedError


class Compose:
    """Apply transforms in order; :class:`RandomTransform` members receive ``rng``.

    Args:
      transforms: the chain, in order.
    """

    def __init__(self, transforms: Iterable[Transform | RandomTransform]):
        self.transforms = tuple(transforms)

    def __call__(self, data: Sample, rng: np.random.Generator | None = None) -> Sample:
        for t in self.transforms:
            if isinstance(t, RandomTransform):
                if rng is None:
                    raise ValueError(f"{type(t).__name__} needs a random generator")
                data = t(data, rng)
            else:
                data = t(data)
        return data

    def __repr__(self) -> str:
        return f"Compose({list(self.transforms)!r})"


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def region_match(ids: Sequence[int]) -> str:
    """The ``match`` of a region class: the union of the label values ``ids``."""
    return "any:" + ",".join(str(int(v)) for v in sorted(set(ids)))


def region_ids(match: str) -> tuple[int, ...]:
    """Label values of a region ``match`` (``"any:1,2,3"``); ValueError for anything else."""
    try:
        if not match.startswith("any:"):
            raise ValueError
        ids = tuple(int(v) for v in match[4:].split(","))
    except (ValueError, AttributeError):
        raise ValueError(
            f"match must be 'equal', 'nonzero' or 'any:<ids>', got {match!r}"
        ) from None
    return ids


def binarize_label(label: np.ndarray, class_id: int, match: Match = "equal") -> np.ndarray:
    """uint8 ``label == class_id`` (``match="equal"``), ``label != 0`` (``"nonzero"``) or
    ``label`` in a region's values (``"any:1,2,3"``, see :func:`region_match`)."""
    label = np.asarray(label)
    if match == "equal":
        return (label == class_id).astype(np.uint8)
    if match == "nonzero":
        return (label != 0).astype(np.uint8)
    return np.isin(label, region_ids(match)).astype(np.uint8)


def is_ct_name(name: str) -> bool:
    """True for a dataset/modality name that marks CT: ``ct``, ``ct_*``, ``CT-*``, ``Dataset012_ct_*``.

    The original clamps every training image whose path contains ``/ct_`` (the modality
    prefix of its ``<modality>_<dataset>`` folders).
    """
    return bool(_CT_NAME_RE.match(_NNUNET_PREFIX_RE.sub("", name)))


class LoadImaged(Transform):
    """Read an item's image and label files and binarise the label for its class.

    Input keys: ``image_path``, ``label_path`` (absolute or relative to ``root``),
    ``class_id``, ``match`` (``"equal"`` or ``"nonzero"``), ``ct``. Output adds ``image``
    (file dtype), ``label`` (uint8 0/1), ``affine``, ``original_shape``, ``original_affine``.

    Raises:
      VolumeError: unreadable/not 3D/non-finite file, or image and label shapes differ (an
        image whose affine alone differs takes the label's, see ``align_to_label``).
    """

    def __init__(self, root: str | Path | None = None):
        self.root = None if root is None else Path(root)

    def _path(self, p: str | Path) -> Path:
        p = Path(p)
        return p if p.is_absolute() or self.root is None else self.root / p

    def __call__(self, data: Sample) -> Sample:
        image = load_volume(self._path(data["image_path"]), kind="image")
        label = load_volume(self._path(data["label_path"]), kind="label")
        image = align_to_label(image, label)
        out = dict(data)
        out["image"] = image.array
        out["label"] = binarize_label(label.array, int(data["class_id"]), data["match"])
        out["affine"] = np.asarray(image.affine, dtype=np.float64)
        out["original_shape"] = tuple(int(v) for v in image.array.shape)
        out["original_affine"] = np.asarray(image.affine, dtype=np.float64)
        return out


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


class Spacingd(Transform):
    """Resample ``image`` (linear) and ``label`` (nearest) to ``pixdim`` mm, ``tio.Resample`` grid.

    Args:
      pixdim: target spacing in mm per array axis.
      enabled: False when the files are already resampled (the original's prepared
        ``imagesTr_1.5`` data); the sample passes through unchanged.
    """

    def __init__(self, pixdim: Sequence[float] = (1.5, 1.5, 1.5), enabled: bool = True):
        self.pixdim = tuple(float(v) for v in pixdim)
        self.enabled = bool(enabled)

    def __call__(self, data: Sample) -> Sample:
        if not self.enabled:
            return data
        out = dict(data)
        out["image"], affine = resample_to_spacing(
            data["image"], data["affine"], self.pixdim, "linear"
        )
        out["label"], _ = resample_to_spacing(data["label"], data["affine"], self.pixdim, "nearest")
        out["affine"] = affine
        return out


class Orientationd(Transform):
    """Re-orient ``image`` and ``label`` to RAS+ (``tio.ToCanonical``: permutation and flips).

    Args:
      enabled: True = the regime the released weights were trained in (the loader kept
        the real affine); False = the original's HEAD, where subjects carry an identity
        affine and ``ToCanonical`` does nothing.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __call__(self, data: Sample) -> Sample:
        if not self.enabled:
            return data
        out = dict(data)
        out["image"], affine, _ = to_canonical(data["image"], data["affine"])
        out["label"], _, _ = to_canonical(data["label"], data["affine"])
        out["affine"] = affine
        return out


class CropOrPadd(Transform):
    """``tio.CropOrPad(spatial_size, mask_name="label")``: the box centred on the label's bbox.

    Pads with 0; an empty label falls back to the centred box. Sets ``crop_start`` and moves
    ``affine`` to the ROI grid.

    Args:
      spatial_size: output edge length ``S`` (or one per axis).
    """

    def __init__(self, spatial_size: int | Sequence[int] = 128):
        self.spatial_size = spatial_size

    def __call__(self, data: Sample) -> Sample:
        label = data["label"]
        start = crop_start_from_mask(label, self.spatial_size)
        if start is None:
            start = crop_start_centered(np.shape(label), self.spatial_size)
        out = dict(data)
        out["image"] = crop_or_pad(data["image"], start, self.spatial_size)
        out["label"] = crop_or_pad(label, start, self.spatial_size)
        out["affine"] = roi_affine(data["affine"], start)
        out["crop_start"] = np.asarray(start, dtype=np.int64)
        return out


def storage_image(image: np.ndarray) -> np.ndarray:
    """The compact dtype a ROI is stored in: int16 when integral and in range, else float32.

    Both are exact for the training output (float32): an integer in int16 range converts
    exactly, and float32 storage is the output dtype itself.
    """
    image = np.asarray(image)
    if image.dtype == np.int16:
        return image
    if np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_:
        if image.size == 0 or (image.min() >= _INT16.min and image.max() <= _INT16.max):
            return image.astype(np.int16)
    return image.astype(np.float32)


class StorageDtyped(Transform):
    """Cast ``image`` with :func:`storage_image` and ``label`` to uint8 (lossless for training)."""

    def __call__(self, data: Sample) -> Sample:
        out = dict(data)
        out["image"] = storage_image(data["image"])
        out["label"] = np.asarray(data["label"], dtype=np.uint8)
        return out


# --------------------------------------------------------------------------------------
# Intensity and augmentation
# --------------------------------------------------------------------------------------


class ClampCTd(Transform):
    """Clamp CT intensities to ``[a_min, a_max]`` (the original's ``tio.Clamp(-1000, 1000)``).

    Args:
      a_min, a_max: clamp range in HU.
      mode: ``"auto"`` clamps samples whose ``ct`` key is true (dataset or modality named
        ``ct*``, see :func:`is_ct_name`), ``"always"`` every sample, ``"never"`` none.
    """

    def __init__(
        self, a_min: float = CT_RANGE[0], a_max: float = CT_RANGE[1], mode: ClampMode = "auto"
    ):
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"mode must be 'auto', 'always' or 'never', got {mode!r}")
        self.a_min, self.a_max, self.mode = float(a_min), float(a_max), mode

    def __call__(self, data: Sample) -> Sample:
        if self.mode == "never" or (self.mode == "auto" and not data.get("ct", False)):
            return data
        image = np.asarray(data["image"])
        info = np.iinfo(image.dtype) if np.issubdtype(image.dtype, np.integer) else None
        if info is not None and float(self.a_min).is_integer() and float(self.a_max).is_integer():
            # Integral bounds keep the storage dtype (same values as clamping in float).
            lo = int(max(self.a_min, info.min))
            hi = int(min(self.a_max, info.max))
            clamped = np.clip(image, lo, hi)
        elif info is not None:
            # A fractional bound is a value integers cannot hold: clamp in float32, as a
            # float32 copy of the same image (TFDS sources, NIfTI floats) is clamped.
            clamped = np.clip(image.astype(np.float32), self.a_min, self.a_max)
        else:
            clamped = np.clip(image, self.a_min, self.a_max).astype(image.dtype, copy=False)
        out = dict(data)
        out["image"] = clamped
        return out


class RandFlipd(RandomTransform):
    """Flip ``image`` and ``label`` along each of ``spatial_axes`` independently with ``prob``.

    One uniform number is drawn per axis, whether or not it flips, so the generator's stream
    does not depend on the outcome (the original's ``tio.RandomFlip(axes=(0, 1, 2))``).
    """

    def __init__(self, prob: float = 0.5, spatial_axes: Sequence[int] = (0, 1, 2)):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        self.prob = float(prob)
        self.spatial_axes = tuple(int(a) for a in spatial_axes)

    def __call__(self, data: Sample, rng: np.random.Generator) -> Sample:
        draws = rng.random(len(self.spatial_axes))
        axes = tuple(a for a, u in zip(self.spatial_axes, draws) if u < self.prob)
        out = dict(data)
        out["flip_axes"] = axes
        if axes:
            out["image"] = np.flip(data["image"], axes)
            out["label"] = np.flip(data["label"], axes)
        return out


# --------------------------------------------------------------------------------------
# Chains and outputs
# --------------------------------------------------------------------------------------


def prepare_transforms(
    crop_size: int = 128,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    resample: bool = True,
    canonical: bool = True,
    root: str | Path | None = None,
    load: bool = True,
) -> Compose:
    """The deterministic chain: [LoadImaged →] Spacingd → Orientationd → CropOrPadd → StorageDtyped."""
    chain: list[Transform] = [LoadImaged(root)] if load else []
    chain += [
        Spacingd(spacing, enabled=resample),
        Orientationd(enabled=canonical),
        CropOrPadd(crop_size),
        StorageDtyped(),
    ]
    return Compose(chain)


def augment_transforms(
    clamp_ct: ClampMode = "auto",
    ct_range: Sequence[float] = CT_RANGE,
    flip_prob: float = 0.5,
) -> Compose:
    """The per-step chain: ClampCTd → RandFlipd (omitted when ``flip_prob == 0``)."""
    chain: list[Transform | RandomTransform] = [ClampCTd(ct_range[0], ct_range[1], clamp_ct)]
    if flip_prob > 0:
        chain.append(RandFlipd(flip_prob))
    return Compose(chain)


def prepare_case(
    image: Volume,
    label: Volume,
    targets: Sequence[tuple[int, Match]],
    crop_size: int = 128,
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    resample: bool = True,
    canonical: bool = True,
) -> list[Sample]:
    """The prepare chain for several targets of one case, resampling each volume once.

    Nearest-neighbour resampling and re-orientation only copy voxel values, so resampling
    the label map once and binarising afterwards gives the same label as binarising first;
    every returned sample equals what :func:`prepare_transforms` gives for that target.

    Args:
      image, label: volumes of the same shape, ``(i, j, k)`` (the image takes the label's
        affine if they differ, see ``align_to_label``).
      targets: ``(class_id, match)`` per output sample.

    Returns:
      One prepared sample per target (keys ``image``, ``label``, ``affine``, ``crop_start``,
      ``original_shape``, ``original_affine``), in ``targets`` order.
    """
    image = align_to_label(image, label)
    lab = np.asarray(label.array)
    if targets and all(m == "nonzero" for _, m in targets):
        lab = (lab != 0).astype(np.uint8)  # only foreground matters; resample a compact map
    base: Sample = {
        "image": image.array,
        "label": lab,
        "affine": np.asarray(image.affine, dtype=np.float64),
    }
    base = Spacingd(spacing, enabled=resample)(base)
    base = Orientationd(enabled=canonical)(base)
    crop, cast = CropOrPadd(crop_size), StorageDtyped()
    out = []
    for class_id, match in targets:
        sample = dict(base)
        sample["label"] = binarize_label(base["label"], class_id, match)
        sample = cast(crop(sample))
        sample["original_shape"] = tuple(int(v) for v in image.array.shape)
        sample["original_affine"] = np.asarray(image.affine, dtype=np.float64)
        out.append(sample)
    return out


def to_example(data: Mapping[str, Any], item: int, valid: bool = True) -> dict[str, np.ndarray]:
    """The training example: ``image`` (S, S, S) float32 raw intensities (not normalised),
    ``label`` (S, S, S) uint8 {0, 1}, ``item`` () int64, ``valid`` () bool."""
    return {
        "image": np.ascontiguousarray(data["image"], dtype=np.float32),
        "label": np.ascontiguousarray(data["label"], dtype=np.uint8),
        "item": np.int64(item),
        "valid": np.bool_(valid),
    }


def zero_example(crop_size: int | Sequence[int], item: int = -1) -> dict[str, np.ndarray]:
    """A placeholder example (zeros, ``valid=False``) that keeps batch shapes static."""
    shape = tuple(np.broadcast_to(np.asarray(crop_size, dtype=np.int64), (3,)).tolist())
    return {
        "image": np.zeros(shape, np.float32),
        "label": np.zeros(shape, np.uint8),
        "item": np.int64(item),
        "valid": np.bool_(False),
    }
