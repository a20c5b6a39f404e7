"""On-device click simulation for training (the original's ``get_next_click3D_torch_2``).

Rule, per sample: ``pred = prev_logits > threshold``, ``true = gt > 0``,
``FN = true ∧ ¬pred``, ``FP = ¬true ∧ pred``, error region ``E = FN ∨ FP``. One voxel of ``E``
is drawn uniformly; its label is 1 when it lies in FN (a positive click) and 0 when it lies in
FP (a negative click). The click is the voxel index ``(a0, a1, a2)``.

The default ``threshold=0.5`` is applied to *logits*, as the original training loop does
(probability about 0.62, not 0.5); inference thresholds logits at 0 (``threshold=0.0``).

Uniformity. The voxels of ``E`` are ranked in C order (the order of ``argwhere``) and the
click is the voxel of rank ``k``, with ``k`` a uniform integer in ``[0, |E|)`` drawn by
rejection sampling on 32-bit draws (exactly uniform unless four draws in a row are rejected,
probability below ``(|E| / 2^32)^4``; see :func:`uniform_index`). This is the same selection
as the original's ``argwhere(E)[randint(len)]``, only with a different random-number
generator. The rank is resolved in two levels (rows of the last axis, then inside one row),
so no cumulative sum over the whole volume is needed.

Where the original crashes (an empty error region, i.e. a perfect prediction) the click is
reported invalid: ``valid=False``, label -1, coordinates 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["error_regions", "nth_voxel", "sample_clicks", "sample_from_region", "uniform_index"]


REJECTION_ROUNDS = 4  # 32-bit draws per sample; see `uniform_index`


def uniform_index(key: Array, n: Array) -> Array:
    """Uniform integers in ``[0, n)`` by rejection sampling on 32-bit draws, without a loop.

    Each sample gets ``REJECTION_ROUNDS`` independent 32-bit draws and takes the first one
    that falls below the largest multiple of n (exactly uniform). A draw is rejected with
    probability ``(2^32 mod n) / 2^32 < n / 2^32``, so all of them are rejected with
    probability below ``(n / 2^32)^4`` (6e-14 for a whole 128³ crop); only then the last
    draw's ``u mod n`` is used, whose bias is below ``n / 2^32`` itself. Straight-line code:
    a data-dependent loop would make XLA:GPU read its predicate on the host inside the step.

    Args:
      key: a PRNG key.
      n: (B,) integer counts, 1 <= n < 2^32 (entries < 1 are treated as 1).

    Returns:
      (B,) int32 draws (the counts of one volume fit in int32).
    """
    n = jnp.maximum(n, 1).astype(jnp.uint32)
    # Accept u when u < 2^32 - (2^32 mod n): the accepted range is a multiple of n.
    rem = (jnp.uint32(0) - n) % n  # 2^32 mod n in uint32 arithmetic
    limit = jnp.uint32(0xFFFFFFFF) - rem  # accept u <= limit
    u = jax.random.bits(key, (REJECTION_ROUNDS, *n.shape), jnp.uint32)
    accepted = u <= limit
    first = jnp.argmax(accepted, axis=0)  # 0 when none is accepted ...
    first = jnp.where(jnp.any(accepted, axis=0), first, REJECTION_ROUNDS - 1)  # ... then the last
    chosen = jnp.take_along_axis(u, first[None], axis=0)[0]
    return (chosen % n).astype(jnp.int32)


def error_regions(prev_logits: Array, gt: Array, threshold: float = 0.5) -> tuple[Array, Array]:
    """Error region and its positive part.

    Args:
      prev_logits: (B, S0, S1, S2) previous full-resolution logits.
      gt: (B, S0, S1, S2) label (non-zero = foreground).
      threshold: logit threshold of the previous prediction.

    Returns:
      ``E = FN ∨ FP`` and ``FN``, both (B, S0, S1, S2) bool.
    """
    pred = jax.lax.stop_gradient(prev_logits) > threshold
    true = gt > 0
    fn = true & ~pred
    fp = ~true & pred
    return fn | fp, fn


def nth_voxel(region: Array, k: Array) -> Array:
    """Index of the voxel of rank ``k`` (C order, 0-based) among the True voxels of ``region``.

    Args:
      region: (B, S0, S1, S2) bool.
      k: (B,) int ranks, ``0 <= k < count`` (other values give an unspecified voxel).

    Returns:
      (B, 3) int32 voxel indices (A0, A1, A2), i.e. ``argwhere(region[b])[k[b]]``.
    """
    b, s0, s1, s2 = region.shape
    rows = region.reshape(b, s0 * s1, s2)
    row_counts = jnp.sum(rows, axis=2, dtype=jnp.int32)  # (B, R)
    row_ends = jnp.cumsum(row_counts, axis=1)  # (B, R) inclusive
    k = k.astype(jnp.int32)
    # First row whose inclusive count exceeds k, then the rank inside that row.
    row = jnp.argmax(row_ends > k[:, None], axis=1)
    before = jnp.take_along_axis(row_ends - row_counts, row[:, None], axis=1)[:, 0]
    row_mask = jnp.take_along_axis(rows, row[:, None, None], axis=1)[:, 0]  # (B, S2)
    in_row = jnp.cumsum(row_mask, axis=1, dtype=jnp.int32)
    col = jnp.argmax(in_row > (k - before)[:, None], axis=1)
    flat = row * s2 + col
    return jnp.stack([flat // (s1 * s2), (flat // s2) % s1, flat % s2], axis=1).astype(jnp.int32)


def sample_from_region(key: Array, region: Array, positive: Array) -> tuple[Array, Array, Array]:
    """Draw one voxel per sample uniformly from ``region``.

    Args:
      key: a PRNG key.
      region: (B, S0, S1, S2) bool candidate voxels.
      positive: (B, S0, S1, S2) bool; the label is 1 where the drawn voxel is positive.

    Returns:
      points (B, 3) int32 voxel indices (A0, A1, A2), labels (B,) int32 in {1, 0} (-1 when
      invalid) and valid (B,) bool (False when the sample's region is empty).
    """
    b, _, s1, s2 = region.shape
    total = jnp.sum(region.reshape(b, -1), axis=1, dtype=jnp.int32)
    valid = total > 0
    k = uniform_index(key, total)
    points = nth_voxel(region, k)
    flat = (points[:, 0] * s1 + points[:, 1]) * s2 + points[:, 2]
    pos = jnp.take_along_axis(positive.reshape(b, -1), flat[:, None], axis=1)[:, 0]
    labels = jnp.where(valid, pos.astype(jnp.int32), -1)
    points = jnp.where(valid[:, None], points, 0)
    return points, labels, valid


def sample_clicks(
    key: Array, prev_logits: Array, gt: Array, threshold: float = 0.5
) -> tuple[Array, Array, Array]:
    """One training click per sample, uniform over the error region (jit-able).

    Args:
      key: a PRNG key.
      prev_logits: (B, S0, S1, S2) previous full-resolution logits (zeros before the first
        click, so the first click is a uniform foreground voxel). Not differentiated.
      gt: (B, S0, S1, S2) label (non-zero = foreground).
      threshold: logit threshold of the previous prediction (0.5 = the original's training
        rule, 0.0 = its inference rule).

    Returns:
      points (B, 3) int32 (A0, A1, A2), labels (B,) int32 (1 in FN, 0 in FP, -1 when invalid),
      valid (B,) bool (False when the error region is empty).
    """
    if prev_logits.shape != gt.shape or prev_logits.ndim != 4:
        raise ValueError(
            f"prev_logits {prev_logits.shape} and gt {gt.shape} must both be (B, S0, S1, S2)"
        )
    region, fn = error_regions(prev_logits, gt, threshold)
    return sample_from_region(key, region, fn)
