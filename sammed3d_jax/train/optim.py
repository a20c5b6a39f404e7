"""AdamW with SAM-Med3D's parameter groups, learning-rate schedules and accumulation.

The original optimiser is ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8, weight decay 0.1)
with three parameter groups: the image encoder at ``lr`` and the prompt encoder and mask
decoder at ``0.1 × lr``. ``optax.adamw`` computes the same update (bias-corrected moments,
``eps`` added after the square root, decoupled decay ``lr · wd · p`` from the parameters
before the step).

Weight decay. PyTorch's AdamW skips parameters whose gradient is ``None``. In the original
training loop those are ``mask_decoder.iou_prediction_head.*`` (its output is never in the
loss) and ``prompt_encoder.no_mask_embed`` (a mask prompt is always given), so they are never
decayed; every other parameter — biases, norms, embeddings, position and relative-position
tables included, and the multimask hypernetworks 1–3 whose gradient is an all-zero tensor —
is decayed. ``original_decay_mask=True`` reproduces that; ``False`` decays everything.
Buffers (the Fourier matrix) are not parameters and are never seen by the optimiser.

Schedules (``schedule``), in **optimizer steps** (updates, not micro-batches):
  - ``"multistep"``: ``lr · gamma^(number of milestones <= step)`` (PyTorch ``MultiStepLR``).
    The original steps its scheduler once per epoch with milestones (120, 180) in epochs; to
    express that, use ``milestones = (120 · U, 180 · U)`` with ``U`` the optimizer updates per
    epoch, ``U = micro_batches_per_epoch // accumulation_steps`` (the original's first window
    of each epoch holds one micro-batch more and its trailing partial window is dropped).
  - ``"constant"``: ``lr``.
  - ``"warmup_cosine"``: linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine
    decay to ``min_lr_ratio · lr`` at ``total_steps``.

Gradient accumulation (``accumulation_steps = k > 1``) wraps everything in
``optax.MultiSteps``: gradients of k consecutive calls are averaged and the inner optimizer
runs on every k-th call (the others return zero updates). With a per-micro-batch mean loss
this equals one step on the union of the k micro-batches (the original divides each loss by
k and sums the gradients: the same average).

``freeze_image_encoder`` zeroes the encoder's updates (``optax.set_to_zero``; no optimizer
state is kept for it) and removes its gradients from the global norm used for clipping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Array = jax.Array

__all__ = [
    "GROUPS",
    "NO_DECAY_ORIGINAL",
    "OptimConfig",
    "decay_mask",
    "group_labels",
    "learning_rates",
    "make_optimizer",
    "make_schedule",
    "param_path",
]

GROUPS = ("image_encoder", "prompt_encoder", "mask_decoder")
# Parameters the original's AdamW never touches (their gradient is None).
NO_DECAY_ORIGINAL = ("iou_prediction_head", "no_mask_embed")

Schedule = Literal["multistep", "constant", "warmup_cosine"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings (defaults = the original ``train.py``).

    Attributes:
      lr: base learning rate of the image encoder.
      prompt_decoder_lr_mult: learning-rate factor of prompt encoder and mask decoder.
      weight_decay, b1, b2, eps: AdamW hyper-parameters.
      schedule: "multistep", "constant" or "warmup_cosine".
      milestones: multistep boundaries in optimizer steps (see the module docstring).
      gamma: multistep factor.
      warmup_steps, total_steps, min_lr_ratio: warm-up + cosine schedule.
      grad_clip_norm: clip the global gradient norm to this value (None or 0: no clipping,
        as the original).
      accumulation_steps: micro-batches per optimizer update (``optax.MultiSteps``).
      freeze_image_encoder: keep the image encoder fixed.
      original_decay_mask: no weight decay on ``iou_prediction_head`` and ``no_mask_embed``.
    """

    lr: float = 8e-4
    prompt_decoder_lr_mult: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Schedule = "multistep"
    milestones: tuple[int, ...] = (120, 180)
    gamma: float = 0.1
    warmup_steps: int = 0
    total_steps: int = 200
    min_lr_ratio: float = 0.0
    grad_clip_norm: float | None = None
    accumulation_steps: int = 1
    freeze_image_encoder: bool = False
    original_decay_mask: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.schedule not in ("multistep", "constant", "warmup_cosine"):
            raise ValueError(
                f"optim.schedule must be 'multistep', 'constant' or 'warmup_cosine', "
                f"got {self.schedule!r}"
            )
        if self.accumulation_steps < 1:
            raise ValueError(
                f"optim.accumulation_steps must be >= 1, got {self.accumulation_steps!r}"
            )
        for name, ok, rule in (
            ("lr", self.lr > 0, "> 0"),
            ("prompt_decoder_lr_mult", self.prompt_decoder_lr_mult >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
            ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("gamma", self.gamma > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
        ):
            value = getattr(self, name)
            if not (ok and np.isfinite(value)):
                raise ValueError(f"optim.{name} must be {rule}, got {value!r}")
        if self.schedule == "warmup_cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"optim.total_steps ({self.total_steps}) must exceed optim.warmup_steps "
                f"({self.warmup_steps}) for the warmup_cosine schedule"
            )
        if self.grad_clip_norm is not None:
            clip = float(self.grad_clip_norm)
            if not np.isfinite(clip) or clip < 0:
                raise ValueError(f"optim.grad_clip_norm must be >= 0 (0: off), got {clip}")
            # Config files spell "no clipping" as 0 (their fields are typed): clipping to a
            # norm of 0 would zero every update.
            object.__setattr__(self, "grad_clip_norm", clip if clip > 0 else None)

    def replace(self, **changes: Any) -> OptimConfig:
        return dataclasses.replace(self, **changes)


def make_schedule(cfg: OptimConfig, scale: float = 1.0) -> optax.Schedule:
    """The learning rate ``scale · lr(step)`` as a function of the optimizer step count."""
    peak = cfg.lr * scale
    if cfg.schedule == "constant":
        return optax.constant_schedule(peak)
    if cfg.schedule == "multistep":
        milestones = jnp.asarray(cfg.milestones or (0,), jnp.int32)
        active = len(cfg.milestones) > 0

        def multistep(count: Array) -> Array:
            if not active:
                return jnp.asarray(peak, jnp.float32)
            passed = jnp.sum(jnp.asarray(count)[..., None] >= milestones, axis=-1)
            return peak * jnp.float32(cfg.gamma) ** passed.astype(jnp.float32)

        return multistep
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=peak * cfg.min_lr_ratio,
    )


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_path(path: tuple[Any, ...]) -> str:
    """Dotted name of a state leaf from its pytree key path (the trailing ``value`` dropped)."""
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":
        names = names[:-1]
    return ".".join(names)


def _map_paths(fn: Callable[[str], Any], params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(param_path(p)), params)


def group_labels(params: Any, cfg: OptimConfig) -> Any:
    """Same-structure tree of group names: a part of ``GROUPS`` or ``"frozen"``."""

    def label(name: str) -> str:
        top = name.split(".", 1)[0]
        if top not in GROUPS:
            raise ValueError(f"parameter {name!r} is outside {GROUPS}")
        if top == "image_encoder" and cfg.freeze_image_encoder:
            return "frozen"
        return top

    return _map_paths(label, params)


def decay_mask(params: Any, cfg: OptimConfig) -> Any:
    """Same-structure tree of bools: True where weight decay applies."""

    def decays(name: str) -> bool:
        if not cfg.original_decay_mask:
            return True
        return not any(part in NO_DECAY_ORIGINAL for part in name.split("."))

    return _map_paths(decays, params)


def _params_of(model_or_params: Any) -> Any:
    if isinstance(model_or_params, nnx.Module):
        return nnx.state(model_or_params, nnx.Param)
    return model_or_params


def _group_scale(cfg: OptimConfig, group: str) -> float:
    if group == "frozen":
        return 0.0
    return 1.0 if group == "image_encoder" else cfg.prompt_decoder_lr_mult


def make_optimizer(model: Any, cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW over ``nnx.state(model, nnx.Param)`` with the original's groups and decay.

    Args:
      model: the ``Sam3D`` module (or its ``nnx.State`` of ``nnx.Param``), used for the
        parameter names only.
      cfg: optimiser settings.

    Returns:
      A gradient transformation over a params tree of the same structure as
      ``nnx.state(model, nnx.Param)``.
    """
    params = _params_of(model)
    labels = group_labels(params, cfg)
    mask = decay_mask(params, cfg)

    def group_mask(group: str) -> Any:
        return jax.tree.map(lambda lab: lab == group, labels)

    transforms: dict[str, optax.GradientTransformation] = {}
    for group in (*GROUPS, "frozen"):
        if group == "frozen":
            transforms[group] = optax.set_to_zero()
            continue
        transforms[group] = optax.adamw(
            learning_rate=make_schedule(cfg, _group_scale(cfg, group)),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p, m=mask: m,
        )
    chain = []
    if cfg.freeze_image_encoder:
        # Frozen gradients are zeroed first so they do not enter the clipping norm.
        chain.append(optax.masked(optax.set_to_zero(), group_mask("frozen")))
    if cfg.grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(optax.multi_transform(transforms, labels))
    tx = optax.chain(*chain) if len(chain) > 1 else chain[0]
    if cfg.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulation_steps).gradient_transformation()
    return tx


def learning_rates(cfg: OptimConfig, step: Array | int) -> dict[str, Array]:
    """Current learning rate of each group at optimizer step ``step`` (0 when frozen).

    Args:
      cfg: optimiser settings.
      step: () number of optimizer updates already applied.

    Returns:
      ``{"lr/image_encoder", "lr/prompt_encoder", "lr/mask_decoder"}`` float32 scalars.
    """
    out = {}
    for group in GROUPS:
        frozen = group == "image_encoder" and cfg.freeze_image_encoder
        scale = 0.0 if frozen else _group_scale(cfg, group)
        out[f"lr/{group}"] = jnp.asarray(make_schedule(cfg, scale)(step), jnp.float32)
    return out
