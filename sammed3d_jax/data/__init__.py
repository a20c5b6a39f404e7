"""Data layer: NIfTI I/O, dataset layouts and the SAM-Med3D inference geometry.

Arrays are in nibabel voxel order ``(i, j, k)`` until :func:`to_canonical`, and in RAS+
canonical order ``(A0, A1, A2)`` afterwards (all 128³ ROI arrays).
"""

from sammed3d_jax.data.geometry import (
    AxisMap,
    EmptyNormalizationRegion,
    Preprocessed,
    canonical_to_source_index,
    crop_or_pad,
    crop_or_pad_around_mask,
    crop_start_around_point,
    mask_bbox,
    merge_class_masks,
    original_voxel_to_roi,
    paste_back,
    preprocess_case,
    preprocess_for_class,
    resample_to_grid,
    resample_to_spacing,
    resampled_grid,
    roi_affine,
    roi_to_original_voxel,
    to_canonical,
    voxel_to_world,
    world_to_voxel,
    znormalize,
)
from sammed3d_jax.data.layout import Case, Discovery, LayoutError, discover_cases, scan_dataset
from sammed3d_jax.data.nifti import Volume, VolumeError, check_same_grid, load_volume, save_mask

__all__ = [
    "AxisMap",
    "Case",
    "Discovery",
    "EmptyNormalizationRegion",
    "LayoutError",
    "Preprocessed",
    "Volume",
    "VolumeError",
    "canonical_to_source_index",
    "check_same_grid",
    "crop_or_pad",
    "crop_or_pad_around_mask",
    "crop_start_around_point",
    "discover_cases",
    "load_volume",
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
    "save_mask",
    "scan_dataset",
    "to_canonical",
    "voxel_to_world",
    "world_to_voxel",
    "znormalize",
]
