"""sammed3d_jax: SAM-Med3D (promptable 3D medical segmentation) in JAX/Flax."""

from sammed3d_jax.checkpoint import load_model
from sammed3d_jax.model import (
    VARIANTS,
    Sam3D,
    Sam3DConfig,
    Sam3DOutput,
    abstract_sam3d,
    build_sam3d,
    count_params,
)

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "Sam3D",
    "Sam3DConfig",
    "Sam3DOutput",
    "abstract_sam3d",
    "build_sam3d",
    "count_params",
    "load_model",
]
