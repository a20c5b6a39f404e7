"""Interactive inference: click-driven prediction, sliding-window tiling and PNG overlays."""

from sammed3d_jax.inference.overlay import save_overlay_png
from sammed3d_jax.inference.predictor import (
    MIN_POINT_BUCKET,
    DecodeOutput,
    NoClickInRoiError,
    Prediction,
    Predictor,
    PredictorError,
    RoiNormalizationError,
    SamEngine,
    TiledPrediction,
    check_clicks,
    point_bucket,
    trace_counts,
)
from sammed3d_jax.inference.tiling import (
    TilingResult,
    Window,
    crop_start_for_points,
    label_oracle,
    tiled_segmentation,
    window_weights,
)

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
    "TilingResult",
    "Window",
    "check_clicks",
    "crop_start_for_points",
    "label_oracle",
    "point_bucket",
    "save_overlay_png",
    "tiled_segmentation",
    "trace_counts",
    "window_weights",
]
