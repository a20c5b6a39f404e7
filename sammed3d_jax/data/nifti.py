"""NIfTI input/output with validation.

Axis convention: every array is in nibabel voxel-index order ``(i, j, k)`` — exactly
``np.asarray(nib.load(path).dataobj)`` — which is also the axis order of the original
SAM-Med3D's torchio tensors ``(1, i, j, k)`` (SimpleITK's ``GetArrayFromImage`` gives the
reverse, ``(k, j, i)``). Affines are nibabel's 4×4 float64 RAS+ affines mapping
``(i, j, k, 1)`` to millimetres. A 3D patch embedding is not symmetric in its axes, so this
order must never be swapped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from sammed3d_jax.files import atomic_path

__all__ = [
    "Volume",
    "VolumeError",
    "align_to_label",
    "check_same_grid",
    "load_volume",
    "save_mask",
]

log = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
GRID_ATOL_MM = 1e-4


class VolumeError(ValueError):
    """An input volume is unusable; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D volume and its grid.

    Attributes:
      array: voxel data ``(i, j, k)`` in the file's own dtype (scaling applied only when the
        header asks for it, which makes the data floating point).
      affine: (4, 4) float64 RAS affine, voxel index → mm.
      path: the file it came from (None when built in memory).
      header: the NIfTI header it was read with, kept so masks can be written on the same
        grid with the same qform/sform codes (None when built in memory).
      mm_per_unit: millimetres per unit of the file's spatial coordinates (its
        ``xyzt_units``: 1000 for metres, 0.001 for microns, else 1); ``affine`` is already
        in mm, masks are written back in the file's units.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    header: nib.Nifti1Header | None = dataclasses.field(default=None, repr=False)
    mm_per_unit: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm per array axis (column norms of the affine)."""
        rzs = self.affine[:3, :3]
        return np.sqrt(np.sum(rzs * rzs, axis=0))

    @property
    def header_zooms(self) -> np.ndarray:
        """Voxel size in mm per array axis as the header's ``pixdim`` states it (nibabel's
        ``get_zooms()``); :attr:`spacing` where there is no header. Equal to ``spacing``
        except in files whose matrix and ``pixdim`` disagree."""
        if self.header is None:
            return self.spacing
        zooms = np.asarray(self.header.get_zooms()[:3], dtype=np.float64) * self.mm_per_unit
        return zooms if zooms.shape == (3,) and np.all(zooms > 0) else self.spacing


def load_volume(path: str | os.PathLike, *, kind: Literal["image", "label"] = "image") -> Volume:
    """Load a 3D NIfTI volume.

    Args:
      path: a ``.nii`` or ``.nii.gz`` file.
      kind: ``"image"`` or ``"label"``; only used in error messages (both are checked for
        NaN/inf voxels: a label map cannot hold them meaningfully either).

    Returns:
      A :class:`Volume` with the array in ``(i, j, k)`` order. A 4D file whose trailing
      dimensions are all 1 is squeezed to 3D.

    Raises:
      VolumeError: missing file, unreadable/not NIfTI, not 3D, non-finite voxels, or a
        non-invertible affine. The message names the file.
    """
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"{p}: file not found")
    if not p.is_file():
        raise VolumeError(f"{p}: not a regular file")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises several unrelated exception types
        raise VolumeError(f"{p}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeError(f"{p}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if len(shape) < 3:
        raise VolumeError(f"{p}: expected a 3D volume, got {len(shape)}D shape {shape}")
    if len(shape) > 3:
        if any(s != 1 for s in shape[3:]):
            raise VolumeError(
                f"{p}: expected a 3D volume, got {len(shape)}D shape {shape} "
                "(only trailing singleton dimensions can be dropped)"
            )
    try:
        array = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise VolumeError(f"{p}: cannot read voxel data ({type(exc).__name__}: {exc})") from exc
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.ndim > 3:
        array = array.reshape(shape[:3])
    if min(array.shape) < 1:
        raise VolumeError(f"{p}: empty volume, shape {array.shape}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise VolumeError(f"{p}: complex voxel data ({array.dtype}) is not a {kind}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise VolumeError(f"{p}: {int(bad.sum())} non-finite (NaN/inf) voxels in the {kind}")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, p)
    header = img.header.copy()
    affine = _with_header_spacing(affine, header)
    mm_per_unit = _MM_PER_UNIT.get(header.get_xyzt_units()[0], 1.0)
    if mm_per_unit != 1.0:
        # NIfTI states pixdim, the quaternion offsets and the sform rows in xyzt_units;
        # nibabel hands them over unconverted, ITK scales them to mm (as here).
        log.warning(
            "%s: spatial units are %s; the grid is converted to mm",
            p,
            header.get_xyzt_units()[0],
        )
        affine = affine.copy()
        affine[:3, :] *= mm_per_unit
    return Volume(array=array, affine=affine, path=p, header=header, mm_per_unit=mm_per_unit)


# Millimetres per NIfTI spatial unit; "unknown" (code 0) is read as mm, as ITK and nibabel do.
_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}


def _with_header_spacing(affine: np.ndarray, header: nib.Nifti1Header) -> np.ndarray:
    """The affine with column lengths equal to the header's voxel sizes, as ITK reads them.

    SimpleITK (the original's reader, through torchio) takes the spacing from ``pixdim`` and
    only the directions from the stored matrix. The matrix is float32, so for an oblique
    grid its column lengths miss ``pixdim`` by ~1e-8 relative, enough to flip
    ``floor(n · spacing / 1.5)`` when the extent is a multiple of the target spacing. Where
    both agree to float32 rounding the columns are rescaled to the header's sizes; files whose
    matrix and ``pixdim`` disagree keep the matrix as it is.
    """
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    rzs = affine[:3, :3]
    lengths = np.sqrt(np.sum(rzs * rzs, axis=0))
    if zooms.shape != (3,) or not np.all(np.abs(lengths - zooms) <= 1e-6 * zooms):
        return affine
    out = affine.copy()
    out[:3, :3] = rzs / lengths * zooms
    return out


def check_affine(affine: Any, path: Path | None = None) -> None:
    """Raise :class:`VolumeError` unless ``affine`` is a finite, invertible 4x4 matrix."""
    where = f"{path}: " if path is not None else ""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise VolumeError(f"{where}affine is not a finite 4x4 matrix")
    rzs = affine[:3, :3]
    spacing = np.sqrt(np.sum(rzs * rzs, axis=0))
    if np.any(spacing <= 0) or abs(np.linalg.det(rzs)) <= 1e-12 * max(1.0, np.prod(spacing)):
        raise VolumeError(f"{where}affine is not invertible:\n{affine}")


def check_same_grid(image: Volume, label: Volume, atol: float = GRID_ATOL_MM) -> None:
    """Raise :class:`VolumeError` unless both volumes share shape and affine (``atol`` mm)."""
    names = f"{image.path or '<image>'} vs {label.path or '<label>'}"
    if tuple(image.array.shape) != tuple(label.array.shape):
        raise VolumeError(
            f"{names}: grid mismatch, shapes {tuple(image.array.shape)} != "
            f"{tuple(label.array.shape)}"
        )
    diff = np.abs(np.asarray(image.affine) - np.asarray(label.affine))
    if not np.all(diff <= atol):
        raise VolumeError(
            f"{names}: grid mismatch, affines differ by up to {diff.max():.3g} mm "
            f"(tolerance {atol} mm)"
        )


def align_to_label(image: Volume, label: Volume, atol: float = GRID_ATOL_MM) -> Volume:
    """The image on the label's grid for training, as the original's dataset does.

    Same shape: voxel arrays are taken as aligned (the original copies the label's origin and
    direction onto the image, then drops both affines); if the affines differ by more than
    ``atol`` mm, the image gets the label's affine and a warning is logged. Different shapes
    raise :class:`VolumeError`.
    """
    names = f"{image.path or '<image>'} vs {label.path or '<label>'}"
    if tuple(image.array.shape) != tuple(label.array.shape):
        raise VolumeError(
            f"{names}: grid mismatch, shapes {tuple(image.array.shape)} != "
            f"{tuple(label.array.shape)}"
        )
    diff = np.abs(np.asarray(image.affine) - np.asarray(label.affine))
    if np.all(diff <= atol):
        return image
    log.warning(
        "%s: affines differ by up to %.3g mm; the image takes the label's grid", names, diff.max()
    )
    return dataclasses.replace(image, affine=np.array(label.affine, dtype=np.float64))


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise VolumeError(f"{path}: output name must end in .nii or .nii.gz")


def save_mask(path: str | os.PathLike, array: np.ndarray, like: Volume) -> Path:
    """Write a uint8 mask on exactly ``like``'s grid, atomically.

    Args:
      path: destination ``.nii`` / ``.nii.gz``.
      array: ``(i, j, k)`` mask with ``like``'s shape; values must fit in uint8.
      like: the volume whose shape, affine and qform/sform codes are copied.

    Returns:
      The written path. The file is first written next to the destination and then moved
      over it with ``os.replace``, so readers never see a partial file.
    """
    dst = Path(path)
    suffix = _nifti_suffix(dst)
    if not isinstance(like, Volume):
        raise VolumeError(
            f"{dst}: like must be a Volume (e.g. load_volume(path)), got {type(like).__name__}"
        )
    data = np.asarray(array)
    if data.shape != tuple(like.array.shape):
        raise VolumeError(f"{dst}: mask shape {data.shape} != grid shape {like.array.shape}")
    if not (data.dtype == np.bool_ or np.issubdtype(data.dtype, np.number)):
        raise VolumeError(f"{dst}: mask of type {data.dtype} cannot be stored as uint8")
    if (
        data.dtype != np.bool_
        and data.size
        and not (
            np.isfinite(data).all()
            and data.min() >= 0
            and data.max() <= 255
            and np.array_equal(data, np.round(data))
        )
    ):
        raise VolumeError(
            f"{dst}: mask values must be whole numbers in 0..255 (a uint8 label map); "
            "threshold probabilities first"
        )
    data = data.astype(np.uint8)
    file_shape = tuple(int(d) for d in like.header.get_data_shape()) if like.header else ()
    if len(file_shape) > 3 and file_shape[:3] == data.shape and set(file_shape[3:]) == {1}:
        data = data.reshape(file_shape)  # the source's trailing singleton axes, kept
    affine = np.asarray(like.affine, dtype=np.float64)
    if type(like.header) is nib.Nifti1Header:  # not NIfTI-2 (a subclass): written as NIfTI-1
        if like.mm_per_unit != 1.0:  # the copied header keeps the file's units
            affine = affine.copy()
            affine[:3, :] /= like.mm_per_unit
        # Copy the raw qform/sform fields and codes rather than refitting them from the
        # float64 affine, so the written grid is bit-identical to the source file's.
        header = like.header.copy()
        header["cal_min"], header["cal_max"] = 0, 0
    else:
        header = nib.Nifti1Header()
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(data, affine, header=header)
    with atomic_path(dst, suffix=suffix) as tmp_name:
        nib.save(img, tmp_name)
    return dst
