"""SAM-Med3D model in Flax NNX, one file per upstream module."""

from sammed3d_jax.model.config import VARIANTS, Sam3DConfig
from sammed3d_jax.model.sam import (
    FlatDef,
    Sam3D,
    Sam3DOutput,
    abstract_sam3d,
    build_sam3d,
    compute_dtype_weights,
    count_params,
    merge_flat,
    split_flat,
)

__all__ = [
    "VARIANTS",
    "FlatDef",
    "Sam3D",
    "Sam3DConfig",
    "Sam3DOutput",
    "abstract_sam3d",
    "build_sam3d",
    "compute_dtype_weights",
    "count_params",
    "merge_flat",
    "split_flat",
]
