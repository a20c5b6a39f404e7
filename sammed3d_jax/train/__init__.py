"""Training: DiceCE loss, on-device click simulation, optimiser and jit-able train/eval steps."""

from sammed3d_jax.train.clicks import nth_voxel, sample_clicks, sample_from_region, uniform_index
from sammed3d_jax.train.losses import dice_ce_loss, dice_score
from sammed3d_jax.train.optim import OptimConfig, learning_rates, make_optimizer
from sammed3d_jax.train.step import (
    TrainConfig,
    TrainState,
    init_train_state,
    make_eval_step,
    make_loss_fn,
    make_train_step,
    normalize_images,
)

__all__ = [
    "OptimConfig",
    "TrainConfig",
    "TrainState",
    "dice_ce_loss",
    "dice_score",
    "init_train_state",
    "learning_rates",
    "make_eval_step",
    "make_loss_fn",
    "make_optimizer",
    "make_train_step",
    "normalize_images",
    "nth_voxel",
    "sample_clicks",
    "sample_from_region",
    "uniform_index",
]
