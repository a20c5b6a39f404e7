"""Pre-training from scratch with the original recipe, at pod / cluster scale.

    # TPU pod: the same command on every host (jax.distributed detects the pod); a bucket
    # is read and written through a mount (gcsfuse), not as a gs:// URL. Checkpoints are
    # finished by renaming their folder: a bucket with hierarchical namespace renames
    # folders atomically; on a flat bucket gcsfuse needs --rename-dir-limit (not atomic).
    python train.py --config configs/pretrain.py:records=/gcs/bucket/sam_med3d_shards \
        --workdir /gcs/bucket/runs/pretrain --config.mesh.fsdp=8
    # SLURM GPU cluster: one task per node (see README "Running on a TPU pod / GPU cluster").

The original: `vit_b_ori`, AdamW lr 8e-4 (encoder) / 8e-5 (prompt encoder, decoder), weight
decay 0.1 on every trained parameter, MultiStepLR x0.1 at 60 % and 90 % of training, 11 clicks
with one no-point pass at a random step and at the end, DiceCE summed over passes, batch 12
with 20-step gradient accumulation, batch-pooled z-normalisation (over each GPU's 12 samples:
`train.normalization_group=12` here when the batch is a multiple of 12, else the whole batch),
CT clamp for `ct*` datasets.
Here the global batch is spread over the mesh (data x fsdp), parameters and optimizer state
are sharded over `fsdp` when the mesh has that axis (`--config.mesh.fsdp=N`, as in the
commands above; the default mesh is all data-parallel, every device holding a whole copy),
and compute is bfloat16. The default takes one optimizer step per
global batch of 96; `batch=12,accumulation=20` is the original's exact schedule. `steps`
counts batches (train-step calls); the milestones are placed at 60 % and 90 % of the
optimizer updates, `steps // accumulation`.
"""

from __future__ import annotations

from configs.common import base_config, optimizer_updates, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, data="", records="", val="", batch=96, steps=200_000, accumulation=1)
    c = base_config()
    c.data.root = args.data
    c.data.records = args.records
    c.val.root = args.val
    c.data.batch_size = args.batch
    c.data.num_workers = 8
    c.model.remat = True
    # Statistics pooled over groups of 12 samples (the original's batch per GPU), not over
    # the whole global batch; with 12 samples per device each device pools its own.
    c.train.normalization_group = 12 if args.batch % 12 == 0 else 0
    c.optim.accumulation_steps = args.accumulation
    updates = optimizer_updates(args.steps, args.accumulation)  # what the schedule counts
    c.optim.total_steps = updates
    c.optim.milestones = (int(updates * 0.6), int(updates * 0.9))
    c.total_steps = args.steps
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c
