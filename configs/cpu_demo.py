"""The built-in default run: a small model trained for a few minutes on CPU on bundled data.

    python train.py                                   # = --config configs/cpu_demo.py
    python train.py --config configs/cpu_demo.py:steps=50   # run and schedule both shortened

Trains the `tiny` architecture from scratch on the real CT/MR volumes in `demo_data/train`
(3 mm grid, 64³ crops = the field of view of the original's 128³ crops at 1.5 mm), evaluates
the held-out `demo_data/val` after 1 and 5 clicks, and leaves a checkpoint, metrics.jsonl,
TensorBoard events, `curves.png` and `predictions.png` in the workdir.
"""

from __future__ import annotations

from pathlib import Path

from configs.common import base_config, parse_arg

DEMO = Path(__file__).resolve().parents[1] / "demo_data"


def get_config(arg: str | None = None):
    args = parse_arg(arg, steps=400, batch=4)
    c = base_config()
    c.model.variant = "tiny"
    c.model.dtype = "float32"
    c.data.root = str(DEMO / "train")
    c.data.spacing = (3.0, 3.0, 3.0)
    c.data.min_volume_mm3 = 1000.0
    c.data.min_crop_voxels = 200
    c.data.clamp_ct = "never"  # CT and MR share the folder
    c.data.batch_size = args.batch
    c.data.cache_items = 256  # the demo set is tiny: read and resample each item once
    c.val.root = str(DEMO / "val")
    c.val.max_items = 16
    c.val.batch_size = 4
    c.train.normalization = "per_volume"
    c.optim.lr = 1e-3
    c.optim.prompt_decoder_lr_mult = 1.0  # a from-scratch decoder learns at the same rate
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = min(20, args.steps // 10)
    c.optim.total_steps = args.steps
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 1.0
    c.total_steps = args.steps
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 50
    c.async_checkpointing = False
    return c
