"""Fine-tune the released SAM-Med3D weights (the common case).

    python convert_torch_weights.py sam_med3d_turbo.pth ckpt/turbo
    python train.py --config configs/finetune.py:init_from=ckpt/turbo,data=/data/train,val=/data/val \
        --workdir runs/finetune
    python train.py --config configs/finetune.py:tiny,data=demo_data/train   # CPU smoke run

The original's fine-tuning settings (lr 8e-5, AdamW, weight decay 0.1, the prompt encoder and
decoder at 0.1x the encoder's rate, 11 simulated clicks per volume, 128³ crops at 1.5 mm, RAS+
orientation, random flips, batch-pooled z-normalisation) with bfloat16 compute and float32
parameters. Two deliberate differences: a linear warm-up (200 updates, at most a tenth of the
run) then cosine decay instead of the original's x0.1 steps at epochs 120 and 180, and gradient
clipping at norm 1.0 (the original clips nothing); the original also accumulates 20 batches
per update: `accumulation=20` does that, with the schedule counted in optimizer updates
(`steps // accumulation`). For the original's schedule: `--config.optim.schedule=multistep
--config.optim.milestones=...` (in updates), `--config.optim.grad_clip_norm=0`,
`accumulation=20`. `tiny` shrinks everything for a CPU run from scratch.
"""

from __future__ import annotations

from configs.common import base_config, optimizer_updates, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(
        arg,
        init_from="",
        data="",
        val="",
        records="",
        tiny=False,
        steps=0,  # 0: 20,000 (50 with tiny)
        batch=0,  # 0: 12 (2 with tiny)
        accumulation=1,
    )
    steps = args.steps or (50 if args.tiny else 20_000)
    updates = optimizer_updates(steps, args.accumulation)  # what the schedule counts
    if args.batch < 0:
        raise ValueError(f"config argument batch={args.batch}: must be positive")
    c = base_config()
    c.init_from = args.init_from
    c.data.root = args.data
    c.data.records = args.records
    c.val.root = args.val
    c.data.batch_size = args.batch or (2 if args.tiny else 12)
    c.optim.lr = 8e-5
    c.optim.schedule = "warmup_cosine"
    c.optim.accumulation_steps = args.accumulation
    c.optim.warmup_steps = min(200, updates // 10)
    c.optim.total_steps = updates
    c.optim.grad_clip_norm = 1.0
    c.total_steps = steps
    c.eval_every = 1_000
    c.checkpoint_every = 500
    if args.tiny:
        c.model.variant = "tiny"
        c.model.dtype = "float32"
        c.data.crop_size = 64
        c.data.spacing = (3.0, 3.0, 3.0)
        c.data.min_volume_mm3 = 1000.0
        c.data.min_crop_voxels = 200
        c.data.cache_items = 256
        c.optim.lr = 1e-3
        c.optim.prompt_decoder_lr_mult = 1.0
        c.optim.warmup_steps = min(5, updates // 10)
        c.eval_every = 25
        c.checkpoint_every = 25
        c.log_every = 5
    return c
