"""Pure, jit-able training and evaluation steps with on-device click simulation.

Training step (``make_train_step``), one call per micro-batch, following the original loop:

1. ``rng = fold_in(rng, state.step)``; the image is z-normalised on device with the mean and
   the unbiased standard deviation of its voxels > 0 — per volume (``"per_volume"``, what
   inference does) or pooled over the valid samples of the batch (``"batch"``, what the
   original training loop does by handing the whole batch to torchio as one multi-channel
   image; ``normalization_group`` pools groups of the batch, as each of the original's
   processes pools its own). Voxels <= 0 are excluded from the statistics but normalised.
   Where the original raises, the statistics fall back: with no positive voxel the mean is
   0, and with fewer than two positive voxels or a zero standard deviation the standard
   deviation is 1 (the mean stays what it is).
2. The image encoder runs once.
3. ``num_clicks`` decoder passes in a ``lax.scan`` (unrolled on GPUs: ``click_loop``). Each
   pass draws one click per sample uniformly from the error region of the previous
   full-resolution logits (logits ``> click_threshold``; the first click is a uniform
   foreground voxel), embeds the prompts with the previous **raw low-res logits** as mask
   prompt (zeros at first; not detached, so gradients flow through every pass and through
   ``mask_downscaling``), decodes a single mask, upsamples it trilinearly and adds its
   DiceCE loss. One "no-point" pass at a random ``t = r``, ``r`` uniform in ``[no_point_low,
   no_point_high]`` (drawn once per batch), and the last pass see the mask prompt only: all
   sparse tokens, the padding point included, are masked out, which equals the original's
   ``points=None`` call. Clicks are drawn at the no-point passes too. With
   ``multi_click=False`` a pointed pass sees its newest click only; with
   ``multi_click=True`` it sees every click so far (``num_clicks`` point slots plus a slot
   mask). A click whose error region is empty is invalid and its slot is masked.
4. The loss is the **sum** of the per-pass losses (each a batch mean over valid samples).

Metrics: ``loss``, ``loss_last`` (final pass), ``dice`` (hard Dice of the final pass with the
logits thresholded at ``dice_threshold``, mean over valid samples), ``grad_norm``,
``param_norm`` (after the update), ``update_norm``, ``clicks_valid_fraction`` and, when an
``OptimConfig`` is given, the learning rate of each group.

Differences from the original, on purpose: the empty-error-region crash becomes a masked
click; clicks come from JAX's generator (the same uniform rule); accumulation windows are
all of equal length; multi-device data parallelism averages gradients (the original's DDP
path trains unsynchronised replicas).

Evaluation step (``make_eval_step``): the inference protocol — clicks accumulate, the binary
previous prediction is ``logits > 0`` (``sample_clicks(..., threshold=0.0)``), the first click
is a uniform foreground voxel, the mask prompt is the previous low-res logits (zeros first),
no no-point passes; when the error region is empty the click is a uniform foreground voxel
(label 1), as in the original's inference. Images are normalised per volume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from sammed3d_jax.model.common import upsample_logits
from sammed3d_jax.train.clicks import error_regions, sample_clicks, sample_from_region
from sammed3d_jax.train.losses import dice_ce_loss, dice_score
from sammed3d_jax.train.optim import OptimConfig, learning_rates

Array = jax.Array
F32 = jnp.float32

__all__ = [
    "TrainConfig",
    "TrainState",
    "global_norm",
    "init_train_state",
    "make_eval_step",
    "make_loss_fn",
    "make_train_step",
    "normalize_images",
]

Normalization = Literal["per_volume", "batch"]
ClickLoop = Literal["auto", "scan", "unroll"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Click-simulation and loss settings of the training step (defaults = the original).

    Attributes:
      num_clicks: decoder passes per batch (11, hard-coded in the original).
      no_point_low, no_point_high: the random no-point pass ``r`` is uniform in
        ``[no_point_low, no_point_high]`` inclusive (the original's ``randint(2, 9)``); the
        last pass is always a no-point pass too.
      multi_click: pointed passes see all clicks so far instead of the newest only.
      click_threshold: logit threshold of the previous prediction for click sampling.
      ce_weight: weight of the BCE term (0 = MONAI < 1.3, Dice only).
      dice_weight: weight of the Dice term.
      normalization: z-normalisation statistics pooled over the "batch" (the original's
        recipe: one mean and std for the whole batch, over voxels > 0) or "per_volume".
      normalization_group: with "batch", pool over consecutive groups of this many samples
        instead of the whole (global) batch (0). The original pools each process's batch
        (12 per GPU); a global batch spread over devices reproduces that with its per-device
        batch here, and each device then reduces only its own samples.
      dice_threshold: logit threshold of the logged Dice.
      remat_clicks: rematerialise each decoder pass in the backward pass (less memory).
      click_loop: "scan" (a device loop over the passes), "unroll" (one straight-line
        program: no per-pass loop control or stacked residuals, more fusion across passes;
        about twice the compile time) or "auto": "unroll" on GPUs, where it is faster (one
        H200, batch 12: 57.3 vs 66.8 ms per step, compiled in 158 vs 76 s; BENCHMARKS.md),
        "scan" elsewhere (the same speed on CPU and less to compile).
    """

    num_clicks: int = 11
    no_point_low: int = 2
    no_point_high: int = 8
    multi_click: bool = False
    click_threshold: float = 0.5
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    normalization: Normalization = "batch"
    normalization_group: int = 0
    dice_threshold: float = 0.5
    remat_clicks: bool = False
    click_loop: ClickLoop = "auto"

    def __post_init__(self) -> None:
        if self.num_clicks < 1:
            raise ValueError("num_clicks must be >= 1")
        if not 0 <= self.no_point_low <= self.no_point_high:
            raise ValueError("need 0 <= no_point_low <= no_point_high")
        if self.normalization not in ("per_volume", "batch"):
            raise ValueError(f"unknown normalization {self.normalization!r}")
        group = self.normalization_group
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise ValueError(f"normalization_group must be an integer >= 0, got {group!r}")
        if group and self.normalization != "batch":
            raise ValueError(
                f"normalization_group={group} pools batch statistics: it needs "
                f"normalization='batch', not {self.normalization!r}"
            )
        if self.click_loop not in ("auto", "scan", "unroll"):
            raise ValueError(
                f"click_loop must be one of auto, scan, unroll, got {self.click_loop!r}"
            )

    @property
    def unroll(self) -> bool:
        """Whether the click loop is unrolled (``click_loop`` resolved on the default backend)."""
        if self.click_loop == "auto":
            return jax.default_backend() == "gpu"
        return self.click_loop == "unroll"

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@struct.dataclass
class TrainState:
    """Everything a training step updates (a pytree; the graph definition stays outside).

    step: () int32 number of micro-batches seen (train-step calls).
    params: ``nnx.State`` of the ``nnx.Param`` variables.
    rest: ``nnx.State`` of every other variable (buffers such as the Fourier matrix).
    opt_state: the optimizer state.
    """

    step: Array
    params: Any
    rest: Any
    opt_state: Any


def init_train_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into (graphdef, params, rest) and initialise the optimizer.

    Returns:
      the static ``graphdef`` (pass it to ``make_train_step``) and the ``TrainState``.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params)
    )
    return graphdef, state


def normalize_images(
    image: Array,
    mode: Normalization = "per_volume",
    sample_mask: Array | None = None,
    group: int = 0,
) -> Array:
    """Z-normalise with the mean and unbiased std of the voxels > 0.

    Args:
      image: (B, S0, S1, S2) raw intensities.
      mode: "per_volume" (statistics of each volume) or "batch" (pooled over the batch).
      sample_mask: optional (B,) bool; invalid samples are excluded from pooled statistics.
      group: with "batch", pool over consecutive groups of this many samples (0: the whole
        batch); B must be a multiple of it.

    Returns:
      (B, S0, S1, S2) float32 ``(x - mean) / std`` applied to every voxel.
    """
    x = image.astype(F32)
    m = x > 0
    if sample_mask is not None:
        m = m & sample_mask.astype(bool)[:, None, None, None]
    if mode == "batch" and group and group != image.shape[0]:
        if group < 0 or image.shape[0] % group:
            raise ValueError(
                f"normalization group {group} must divide the batch size {image.shape[0]}"
            )
        return _normalize_in_groups(x, m, group)
    axes = (1, 2, 3) if mode == "per_volume" else (0, 1, 2, 3)
    n = jnp.sum(m, axis=axes, keepdims=True, dtype=jnp.int32).astype(F32)
    mean = jnp.sum(jnp.where(m, x, 0.0), axis=axes, keepdims=True) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(m, (x - mean) ** 2, 0.0), axis=axes, keepdims=True) / jnp.maximum(
        n - 1.0, 1.0
    )
    std = jnp.sqrt(var)
    ok = (n > 1.0) & (std > 0)
    mean = jnp.where(n > 0, mean, 0.0)
    std = jnp.where(ok, std, 1.0)
    return (x - mean) / std


def _normalize_in_groups(x: Array, m: Array, group: int) -> Array:
    """`normalize_images` pooled over consecutive groups of ``group`` samples.

    Every image-sized reduction is per sample; only (B,) sums are pooled over a group. A
    group that does not line up with the batch's sharding (e.g. 12 over 18 samples per
    device) then moves a few numbers between devices, not the volumes themselves.
    """
    b = x.shape[0]
    axes = (1, 2, 3)

    def pooled(per_sample: Array) -> Array:  # (B,) -> each sample's group total, (B,)
        return jnp.repeat(per_sample.reshape(b // group, group).sum(1), group)

    n = pooled(jnp.sum(m, axis=axes, dtype=jnp.int32).astype(F32))
    mean = pooled(jnp.sum(jnp.where(m, x, 0.0), axis=axes)) / jnp.maximum(n, 1.0)
    mean = mean[:, None, None, None]
    squares = jnp.sum(jnp.where(m, (x - mean) ** 2, 0.0), axis=axes)
    std = jnp.sqrt(pooled(squares) / jnp.maximum(n - 1.0, 1.0))[:, None, None, None]
    n = n[:, None, None, None]
    mean = jnp.where(n > 0, mean, 0.0)
    std = jnp.where((n > 1.0) & (std > 0), std, 1.0)
    return (x - mean) / std


def global_norm(tree: Any) -> Array:
    """The L2 norm of all leaves together, float32 (``optax.global_norm``, summed in groups).

    Leaves of the same shape, dtype and sharding annotation (``logical_axes`` of an
    ``nnx.Variable``: the encoder blocks' weights, ...) are stacked and reduced together,
    which XLA compiles into one reduction per group instead of one per leaf: a few dozen
    kernels for the whole model instead of hundreds, per norm and step. Leaves of one group
    are laid out alike on any mesh, so stacking them moves no data between devices.
    """
    groups: dict[tuple[Any, ...], list[Array]] = {}
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = None
        if isinstance(leaf, nnx.Variable):
            axes = leaf.get_metadata().get("logical_axes")
            leaf = leaf[...]
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        groups.setdefault((leaf.shape, leaf.dtype, axes), []).append(leaf)
    total = jnp.zeros((), F32)
    for leaves in groups.values():
        x = leaves[0] if len(leaves) == 1 else jnp.stack(leaves)
        total = total + jnp.sum(jnp.square(x.astype(F32)))
    return jnp.sqrt(total)


def _sample_mask(batch: Mapping[str, Array]) -> Array:
    b = batch["label"].shape[0]
    m = batch.get("sample_mask")
    return jnp.ones((b,), bool) if m is None else m.astype(bool)


def _masked_mean(values: Array, mask: Array) -> Array:
    w = mask.astype(F32)
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def make_loss_fn(
    graphdef: nnx.GraphDef, train_cfg: TrainConfig
) -> Callable[[Any, Any, Mapping[str, Array], Array], tuple[Array, dict[str, Array]]]:
    """The differentiable part of the training step.

    Returns:
      ``loss_fn(params, rest, batch, rng) -> (loss, aux)`` with the summed loss () float32 and
      ``aux = {"loss_last", "dice", "clicks_valid_fraction"}`` scalars; ``rng`` is used as
      given (``make_train_step`` folds in the step first).
    """
    cfg = train_cfg
    n_iter = cfg.num_clicks
    n_slots = n_iter if cfg.multi_click else 1

    def loss_fn(
        params: Any, rest: Any, batch: Mapping[str, Array], rng: Array
    ) -> tuple[Array, dict[str, Array]]:
        gt = batch["label"]
        b = gt.shape[0]
        sample_mask = _sample_mask(batch)
        model = nnx.merge(graphdef, params, rest)
        size = model.config.img_size
        low_size = model.config.low_res_size
        image = normalize_images(
            batch["image"], cfg.normalization, sample_mask, cfg.normalization_group
        )
        emb = model.encode(image)
        image_pe = model.prompt_encoder.get_dense_pe()

        r_key, click_key = jax.random.split(rng)
        r = jax.random.randint(r_key, (), cfg.no_point_low, cfg.no_point_high + 1)
        keys = jax.random.split(click_key, n_iter)

        # In a device loop, upsampling and loss (and the decoder's upscaling) are recomputed
        # in the backward pass: otherwise every pass keeps several full-resolution tensors
        # (sigmoid, exp(-|x|), masks; 64x the low-res size) stacked for the whole loop.
        # Unrolled, XLA schedules each pass's residuals itself, and recomputing them only
        # adds kernels and traffic (H200 program of the original recipe: 6,283 -> 5,964
        # thunks, 7.65 -> 7.48 GiB; BENCHMARKS.md).
        def full_res_loss(low_logits: Array) -> Array:
            return dice_ce_loss(
                upsample_logits(low_logits, size),
                gt,
                cfg.ce_weight,
                cfg.dice_weight,
                sample_mask=sample_mask,
            )

        def one_pass(carry, xs):
            low, full, pts, labs, slot_valid = carry
            t, key = xs
            m = nnx.merge(graphdef, params, rest)
            p, lab, valid = sample_clicks(key, full, gt, cfg.click_threshold)
            if cfg.multi_click:
                pts = jax.lax.dynamic_update_slice_in_dim(pts, p[:, None], t, axis=1)
                labs = jax.lax.dynamic_update_slice_in_dim(labs, lab[:, None], t, axis=1)
                slot_valid = jax.lax.dynamic_update_slice_in_dim(
                    slot_valid, valid[:, None], t, axis=1
                )
            else:
                pts, labs, slot_valid = p[:, None], lab[:, None], valid[:, None]
            no_point = (t == r) | (t == n_iter - 1)
            sparse, dense, tok_valid = m.prompt_encoder(
                (pts.astype(F32), labs), low, point_mask=slot_valid
            )
            tok_valid = tok_valid & ~no_point
            new_low, _ = m.mask_decoder(
                emb,
                image_pe,
                sparse,
                dense,
                multimask_output=False,
                sparse_mask=tok_valid,
                remat_upscaling=not cfg.unroll,
            )
            new_low = new_low[:, 0].astype(F32)
            # The carry only feeds click sampling and the logged Dice: no gradient.
            new_full = upsample_logits(jax.lax.stop_gradient(new_low), size)
            loss = (full_res_loss if cfg.unroll else jax.checkpoint(full_res_loss))(new_low)
            n_valid = jnp.sum(valid & sample_mask).astype(F32)
            return (new_low, new_full, pts, labs, slot_valid), (loss, n_valid)

        body = jax.checkpoint(one_pass) if cfg.remat_clicks else one_pass
        init = (
            jnp.zeros((b, low_size, low_size, low_size), F32),
            jnp.zeros((b, size, size, size), F32),
            jnp.zeros((b, n_slots, 3), jnp.int32),
            -jnp.ones((b, n_slots), jnp.int32),
            jnp.zeros((b, n_slots), bool),
        )
        (_, full, *_), (losses, n_valid) = jax.lax.scan(
            body,
            init,
            (jnp.arange(n_iter, dtype=jnp.int32), keys),
            unroll=n_iter if cfg.unroll else 1,
        )
        n_samples = jnp.maximum(jnp.sum(sample_mask).astype(F32), 1.0)
        dice = _masked_mean(dice_score(full, gt, cfg.dice_threshold), sample_mask)
        aux = {
            "loss_last": losses[-1],
            "dice": dice,
            "clicks_valid_fraction": jnp.sum(n_valid) / (n_iter * n_samples),
        }
        return jnp.sum(losses), aux

    return loss_fn


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig | None = None,
) -> Callable[[TrainState, Mapping[str, Array], Array], tuple[TrainState, dict[str, Array]]]:
    """A pure ``train_step(state, batch, rng) -> (state, metrics)``; jit it at the call site.

    Args:
      graphdef: from ``init_train_state``.
      tx: the optimizer (``make_optimizer``).
      train_cfg: click loop and loss settings.
      optim_cfg: if given, the metrics include the learning rate of each group at the
        current optimizer step (``state.step // accumulation_steps``).

    The batch holds ``image`` (B, S, S, S) float32 raw intensities, ``label`` (B, S, S, S)
    {0, 1} and optionally ``sample_mask`` (B,) bool (False for padding samples). Metrics are
    float32 scalars. Jit with ``donate_argnums=0`` to update the state in place.
    """
    loss_fn = make_loss_fn(graphdef, train_cfg)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(
        state: TrainState, batch: Mapping[str, Array], rng: Array
    ) -> tuple[TrainState, dict[str, Array]]:
        rng = jax.random.fold_in(rng, state.step)
        (loss, aux), grads = grad_fn(state.params, state.rest, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if "sample_mask" in batch:
            # A batch without one valid sample (every file unreadable) moves no weight:
            # AdamW's momentum and weight decay would (its moments decay as for a zero
            # gradient). Gating the updates, not the new values, keeps the update in place.
            learn = jnp.any(batch["sample_mask"])
            updates = jax.tree.map(lambda u: jnp.where(learn, u, jnp.zeros_like(u)), updates)
        params = optax.apply_updates(state.params, updates)
        # The norms read the new parameters and the updates as computed: fused into their
        # reductions, both would be recomputed from the old parameters after the in-place
        # (donated) update has overwritten them, and XLA then copies every parameter first
        # (a copy of every parameter per step in the GPU program).
        params, updates = jax.lax.optimization_barrier((params, updates))
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": global_norm(grads),
            "param_norm": global_norm(params),
            "update_norm": global_norm(updates),
        }
        if optim_cfg is not None:
            metrics.update(learning_rates(optim_cfg, state.step // optim_cfg.accumulation_steps))
        metrics = {k: jnp.asarray(v, F32) for k, v in metrics.items()}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, num_clicks: int = 5, return_predictions: bool = False
) -> Callable[[tuple[Any, Any], Mapping[str, Array], Array], dict[str, Array]]:
    """A pure ``eval_step((params, rest), batch, rng) -> {"dice_per_click": (B, num_clicks)}``.

    With ``return_predictions`` the output also holds the final full-resolution ``logits``
    (B, S, S, S) and the clicks (``points`` (B, num_clicks, 3), ``labels`` (B, num_clicks)).

    Dice per click is the hard Dice of ``logits > 0`` against ``label > 0`` at full resolution
    after each click (NaN where prediction and label are both empty). The batch holds
    ``image`` (B, S, S, S) raw intensities and ``label`` (B, S, S, S).
    """

    def eval_step(
        variables: tuple[Any, Any], batch: Mapping[str, Array], rng: Array
    ) -> dict[str, Array]:
        params, rest = variables
        gt = batch["label"]
        b = gt.shape[0]
        model = nnx.merge(graphdef, params, rest)
        size = model.config.img_size
        low_size = model.config.low_res_size
        emb = model.encode(normalize_images(batch["image"], "per_volume"))
        image_pe = model.prompt_encoder.get_dense_pe()
        keys = jax.random.split(rng, num_clicks)

        def one_click(carry, xs):
            low, full, pts, labs, slot_valid = carry
            t, key = xs
            m = nnx.merge(graphdef, params, rest)
            region, fn = error_regions(full, gt, 0.0)
            empty = ~jnp.any(region, axis=(1, 2, 3))
            fg = gt > 0
            region = jnp.where(empty[:, None, None, None], fg, region)
            positive = jnp.where(empty[:, None, None, None], fg, fn)
            p, lab, valid = sample_from_region(key, region, positive)
            pts = jax.lax.dynamic_update_slice_in_dim(pts, p[:, None], t, axis=1)
            labs = jax.lax.dynamic_update_slice_in_dim(labs, lab[:, None], t, axis=1)
            slot_valid = jax.lax.dynamic_update_slice_in_dim(slot_valid, valid[:, None], t, axis=1)
            sparse, dense, tok_valid = m.prompt_encoder(
                (pts.astype(F32), labs), low, point_mask=slot_valid
            )
            new_low, _ = m.mask_decoder(
                emb, image_pe, sparse, dense, multimask_output=False, sparse_mask=tok_valid
            )
            new_low = new_low[:, 0].astype(F32)
            new_full = upsample_logits(new_low, size)
            dice = dice_score(new_full, gt, threshold=0.0)
            return (new_low, new_full, pts, labs, slot_valid), dice

        init = (
            jnp.zeros((b, low_size, low_size, low_size), F32),
            jnp.zeros((b, size, size, size), F32),
            jnp.zeros((b, num_clicks, 3), jnp.int32),
            -jnp.ones((b, num_clicks), jnp.int32),
            jnp.zeros((b, num_clicks), bool),
        )
        (_, full, pts, labs, _), dice = jax.lax.scan(
            one_click, init, (jnp.arange(num_clicks, dtype=jnp.int32), keys)
        )
        out = {"dice_per_click": dice.T}
        if return_predictions:
            out.update(logits=full, points=pts, labels=labs)
        return out

    return eval_step
