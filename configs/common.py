"""Shared defaults and argument parsing for the training configs.

Every config is `configs/<name>.py` with `get_config(arg=None)`; `arg` is the text after the
colon in `--config configs/<name>.py:variant=vit_b_ori,runlocal`. Fields are overridden on
the command line with `--config.optim.lr=1e-4` (typed; unknown fields raise).

Weights are initialised, in this priority order:
  1. the latest checkpoint in the workdir (automatic resume after preemption);
  2. `init_from`: a converted PyTorch checkpoint directory or a `.pth` file (fine-tuning);
  3. random initialisation from `seed`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from sammed3d_jax.sharding import DEFAULT_RULES


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse "k1=v1,flag" into a ConfigDict over `defaults` (bare names set True)."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for part in arg.split(","):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        if not _:
            out[key] = True
            continue
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in _BOOLS:
                raise ValueError(f"config argument {key}={value!r}: expected one of {_BOOLS}")
            out[key] = _BOOLS.index(value.lower()) % 2 == 0
        elif isinstance(default, (int, float)):
            try:
                out[key] = type(default)(value)
            except ValueError:
                kind = "an integer" if isinstance(default, int) else "a number"
                raise ValueError(f"config argument {key}={value!r}: expected {kind}") from None
        else:
            out[key] = value
    return out


_BOOLS = ("true", "false", "1", "0", "yes", "no")  # even index: True


def optimizer_updates(steps: int, accumulation: int) -> int:
    """Optimizer updates of a run of `steps` batches accumulated `accumulation` at a time
    (what the learning-rate schedule counts); the config arguments are checked by name."""
    if accumulation < 1 or steps < accumulation:
        raise ValueError(
            f"config arguments steps={steps}, accumulation={accumulation}: need "
            f"accumulation >= 1 and steps >= accumulation (at least one optimizer update)"
        )
    return steps // accumulation


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Architecture: a registry variant plus numeric options (see Sam3DConfig).
    c.model = ml_collections.ConfigDict(
        dict(
            variant="vit_b_ori",
            dtype="bfloat16",
            remat=False,
            window_attention="exact",
            attention_impl="auto",  # cuDNN fused attention on NVIDIA GPUs in bf16
            gelu="auto",  # encoder GELU: tanh form in bf16, exact (erf) in float32
        )
    )
    c.init_from = ""  # converted checkpoint dir or .pth (fine-tuning); "" = from scratch
    c.freeze_image_encoder = False
    # Input pipeline (sammed3d_jax.data.pipeline.DataConfig fields).
    c.data = ml_collections.ConfigDict(
        dict(
            root="",
            records="",
            tfds_dir="",  # a prepared TFDS dataset version folder (prepare_tfds)
            layout="auto",
            splits=("Tr",),
            crop_size=0,  # 0: the model's input size (the only size it takes)
            spacing=(1.5, 1.5, 1.5),
            resample=True,
            canonical=True,
            clamp_ct="auto",
            flip_prob=0.5,
            min_volume_mm3=10.0,
            min_crop_voxels=1001,
            batch_size=12,
            num_workers=0,
            cache_items=0,
        )
    )
    # Held-out data for periodic validation ("" = none); max_items: a fixed sample of that many
    # items spread over the whole held-out list (0 = all of them).
    c.val = ml_collections.ConfigDict(
        dict(root="", records="", splits=("Tr",), max_items=64, clicks=(1, 5), batch_size=0)
    )
    # Click simulation and loss (sammed3d_jax.train.step.TrainConfig fields).
    c.train = ml_collections.ConfigDict(
        dict(
            num_clicks=11,
            no_point_low=2,
            no_point_high=8,
            multi_click=False,
            click_threshold=0.5,
            ce_weight=1.0,
            dice_weight=1.0,
            normalization="batch",
            normalization_group=0,  # 0: pool the whole batch; n: groups of n samples
            dice_threshold=0.5,
            remat_clicks=False,
            click_loop="auto",  # unrolled on GPUs (faster there), a device loop elsewhere
        )
    )
    # Optimizer (sammed3d_jax.train.optim.OptimConfig fields).
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=8e-4,
            prompt_decoder_lr_mult=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            schedule="multistep",
            milestones=(120_000, 180_000),
            gamma=0.1,
            warmup_steps=0,
            total_steps=200_000,
            min_lr_ratio=0.0,
            grad_clip_norm=0.0,  # 0: no clipping (the original)
            accumulation_steps=1,
            original_decay_mask=True,
        )
    )
    c.total_steps = 200_000  # train-step calls (micro-batches)
    c.log_every = 50
    c.eval_every = 5_000  # 0: no in-training evaluation (val.* kept)
    # Saves every N steps, after the first step (a broken save shows at once) and at the end;
    # the newest keep_checkpoints are kept.
    c.checkpoint_every = 1_000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.plot_every_eval = True  # redraw curves.png after each evaluation (always at the end)
    c.profile_steps = ()  # e.g. (10, 15): jax profiler trace over these steps
    # Compiled programs kept across runs, so a resumed run does not compile its step again:
    # "auto" = $JAX_COMPILATION_CACHE_DIR if set, else <workdir>/compilation_cache;
    # "" = off; or a folder.
    c.compilation_cache = "auto"
    # Device mesh: axis sizes, -1 = the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = tuple((k, v) for k, v in DEFAULT_RULES)
    # Multi-host: set by train.py flags or detected from the environment.
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1, local_device_ids="")
    )
    return c
