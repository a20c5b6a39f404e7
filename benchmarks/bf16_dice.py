"""Held-out Dice of a trained run in float32 vs bfloat16 compute (same weights, same clicks).

    python benchmarks/bf16_dice.py runs/cpu_demo [--clicks 5]

Loads the latest checkpoint of a `train.py` workdir, evaluates its validation set (the run's
own data settings) with the inference click protocol in float32 and in bfloat16 (float32
parameters, LayerNorm/softmax/positional encodings in float32), and prints one JSON object
with the mean Dice after each click for both and the voxel agreement of the masks after the
first click (later clicks come from each run's own errors, so they can differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import jax
    import ml_collections
    import numpy as np
    from flax import nnx

    from sammed3d_jax.checkpoint import load_model
    from sammed3d_jax.data.pipeline import make_eval_dataset
    from sammed3d_jax.train.loop import data_config
    from sammed3d_jax.train.step import make_eval_step

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--max-items", type=int, default=64)
    args = parser.parse_args(argv)
    run = ml_collections.ConfigDict(json.loads((args.workdir / "config.json").read_text()))
    data = dict(run.data.to_dict())
    data.update(
        root=run.val.root or run.data.root,
        records=run.val.records,
        flip_prob=0.0,
        splits=tuple(run.val.splits),
        num_workers=0,
    )
    results, masks = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(args.workdir, dtype=dtype)
        cfg = data_config(data, model.config.img_size, batch_size=2)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        step = jax.jit(make_eval_step(graphdef, args.clicks))
        first = jax.jit(make_eval_step(graphdef, 1, return_predictions=True))
        dice, preds, seen = [], [], 0
        for batch in make_eval_dataset(cfg):
            inputs = {"image": batch["image"], "label": batch["label"]}
            out = step((params, rest), inputs, jax.random.key(0))
            valid = np.asarray(batch["valid"])
            dice.append(np.asarray(out["dice_per_click"])[valid])
            # After the first click (same click for both dtypes; later clicks are drawn from
            # each run's own errors and may differ).
            preds.append(
                np.asarray(first((params, rest), inputs, jax.random.key(0))["logits"])[valid] > 0
            )
            seen += int(valid.sum())
            if seen >= args.max_items:
                break
        d = np.concatenate(dice)
        results[dtype] = {f"dice_{c + 1}": float(np.nanmean(d[:, c])) for c in range(args.clicks)}
        masks[dtype] = np.concatenate(preds)
    a, b = masks["float32"], masks["bfloat16"]
    inter = np.logical_and(a, b).sum()
    out = {
        "workdir": str(args.workdir),
        "items": len(a),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
        "click1_mask_agreement_dice_fp32_vs_bf16": float(2 * inter / max(a.sum() + b.sum(), 1)),
        "click1_mask_voxels_differing_fraction": float(np.mean(a != b)),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
