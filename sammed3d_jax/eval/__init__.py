"""Evaluation: segmentation metrics (Dice, NSD, challenge aggregates) and click simulators."""

from sammed3d_jax.eval.clicks import (
    cvpr25_click,
    largest_error_component,
    ritm_click,
    sammed3d_click,
)
from sammed3d_jax.eval.metrics import (
    CVPR25_NSD_DSC_THRESHOLD,
    CVPR25_NSD_TOLERANCE_MM,
    CVPR25_NUM_CLICKS,
    SAMMED3D_NSD_TOLERANCE_MM,
    SurfaceDistances,
    cvpr25_auc,
    cvpr25_step_metrics,
    cvpr25_summary,
    dice,
    nsd,
    nsd_from_distances,
    per_class_metrics,
    surface_distances,
    surfel_area_table,
)

__all__ = [
    "CVPR25_NSD_DSC_THRESHOLD",
    "CVPR25_NSD_TOLERANCE_MM",
    "CVPR25_NUM_CLICKS",
    "SAMMED3D_NSD_TOLERANCE_MM",
    "SurfaceDistances",
    "cvpr25_auc",
    "cvpr25_click",
    "cvpr25_step_metrics",
    "cvpr25_summary",
    "dice",
    "largest_error_component",
    "nsd",
    "nsd_from_distances",
    "per_class_metrics",
    "ritm_click",
    "sammed3d_click",
    "surface_distances",
    "surfel_area_table",
]
