"""Training loss and the logged Dice score of SAM-Med3D.

Loss (``dice_ce_loss``)
    MONAI ``DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")`` on single-channel
    logits, the loss of the original training loop:

    - Dice part, per sample over all voxels with ``p = sigmoid(logits)`` and ``g`` the target:
      ``1 - (2 Σ p·g + 1e-5) / (Σ p² + Σ g² + 1e-5)``, averaged over the batch;
    - CE part: binary cross-entropy with logits, averaged over every voxel of the batch
      (MONAI >= 1.3). MONAI < 1.3 applied a softmax cross-entropy over the single channel,
      which is identically 0: ``ce_weight=0`` reproduces that version (the one the released
      weights were most likely trained with).

    Both parts are computed in float32 whatever the dtype of the logits. A per-sample
    ``sample_mask`` (bool or float weights) removes padded samples: every per-sample term is
    weighted and the batch mean becomes ``Σ w_b l_b / Σ w_b`` (0 when all weights are 0).
    With all samples valid this is exactly MONAI's mean (all samples have the same number of
    voxels, so the voxel mean of the BCE equals the mean of the per-sample voxel means).

Logged Dice (``dice_score``)
    ``2 |P ∧ G| / (|P| + |G|)`` per sample with ``P = logits > threshold`` and ``G = target > 0``.
    The original's training log thresholds the *logits* at 0.5; inference thresholds them at 0
    (probability 0.5). When both masks are empty the score is ``empty_value``, NaN by default
    as in the original and in SAM-Med3D's evaluation (training items always have a non-empty
    target, so this only concerns padded samples, which callers mask out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32

__all__ = ["DICE_SMOOTH", "bce_with_logits", "dice_ce_loss", "dice_loss", "dice_score"]

DICE_SMOOTH = 1e-5  # MONAI's smooth_nr = smooth_dr


def _voxel_axes(x: Array) -> tuple[int, ...]:
    # Reducing over the trailing axes in place (not over a (B, V) reshape): XLA:CPU runs the
    # backward pass of a reduction over a reshaped axis an order of magnitude slower.
    return tuple(range(1, x.ndim))


def bce_with_logits(logits: Array, target: Array) -> Array:
    """Per-sample mean binary cross-entropy with logits.

    Args:
      logits: (B, ...) raw logits (any float dtype).
      target: (B, ...) targets in [0, 1] (any dtype).

    Returns:
      (B,) float32 mean over the voxels of each sample, computed like PyTorch's
      ``BCEWithLogitsLoss``: ``max(x, 0) - x·y + log(1 + exp(-|x|))``.
    """
    x = logits.astype(F32)
    y = target.astype(F32)
    per_voxel = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.mean(per_voxel, axis=_voxel_axes(x))


def dice_loss(logits: Array, target: Array) -> Array:
    """Per-sample squared-denominator soft Dice loss on sigmoid probabilities.

    Args:
      logits: (B, ...) raw logits.
      target: (B, ...) targets in {0, 1}.

    Returns:
      (B,) float32 ``1 - (2 Σ p·g + 1e-5) / (Σ p² + Σ g² + 1e-5)``.
    """
    p = jax.nn.sigmoid(logits.astype(F32))
    g = target.astype(F32)
    axes = _voxel_axes(p)
    inter = jnp.sum(p * g, axis=axes)
    denom = jnp.sum(p * p, axis=axes) + jnp.sum(g * g, axis=axes)
    return 1.0 - (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)


def _weighted_mean(values: Array, sample_mask: Array | None) -> Array:
    if sample_mask is None:
        return jnp.mean(values)
    w = sample_mask.astype(F32)
    total = jnp.sum(w)
    weighted = jnp.where(w > 0, w * values, 0.0)  # a padded sample's NaN stays out
    return jnp.where(total > 0, jnp.sum(weighted) / jnp.maximum(total, 1e-12), 0.0)


def dice_ce_loss(
    logits: Array,
    target: Array,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    sample_mask: Array | None = None,
) -> Array:
    """MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)`` for one-channel logits.

    Args:
      logits: (B, S, S, S) raw logits (float32 or bfloat16; the loss is float32).
      target: (B, S, S, S) binary target (bool, integer or float 0/1).
      ce_weight: weight of the BCE-with-logits term (0 reproduces MONAI < 1.3).
      dice_weight: weight of the Dice term.
      sample_mask: optional (B,) bool or float per-sample weights; 0 removes a sample.

    Returns:
      () float32: ``dice_weight · mean_b Dice_b + ce_weight · mean_b BCE_b``.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {logits.shape} and target {target.shape} differ in shape")
    loss = dice_weight * dice_loss(logits, target)
    if ce_weight:
        loss = loss + ce_weight * bce_with_logits(logits, target)
    return _weighted_mean(loss, sample_mask)


def dice_score(
    logits: Array,
    target: Array,
    threshold: float = 0.5,
    empty_value: float = float("nan"),
) -> Array:
    """Hard Dice per sample of ``logits > threshold`` against ``target > 0``.

    Args:
      logits: (B, ...) raw logits.
      target: (B, ...) label (non-zero = foreground).
      threshold: logit threshold (0.5 for the original's training log, 0 for inference).
      empty_value: value when prediction and target are both empty (NaN by default).

    Returns:
      (B,) float32 Dice in [0, 1] (or ``empty_value``).
    """
    p = logits.reshape(logits.shape[0], -1) > threshold
    g = target.reshape(target.shape[0], -1) > 0
    inter = jnp.sum(p & g, axis=1).astype(F32)
    total = (jnp.sum(p, axis=1) + jnp.sum(g, axis=1)).astype(F32)
    return jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), jnp.float32(empty_value))
