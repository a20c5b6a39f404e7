"""Held-out Dice of a trained run in float32 vs bfloat16 compute (same weights, same clicks).

    python benchmarks/bf16_dice.py runs/cpu_demo [--clicks 5]

Loads the latest checkpoint of a `train.py` workdir, evaluates its validation set (the run's
own data settings) with the inference click protocol in float32, in bfloat16 as configured by
default (float32 parameters, LayerNorm/softmax/positional encodings in float32, GELU's tanh
form) and in bfloat16 with the exact GELU, and prints one JSON object with the mean Dice after
each click for each and the voxel agreement of each bfloat16 run's masks with float32's after
the first click (later clicks come from each run's own errors, so they can differ).
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the click sampling")
    args = parser.parse_args(argv)
    run = ml_collections.ConfigDict(json.loads((args.workdir / "config.json").read_text()))
    data = dict(run.data.to_dict())
    data.update(
        root=run.val.root or run.data.root,
        records=run.val.records,
        flip_prob=0.0,
        splits=tuple(run.val.splits),
        num_workers=0,
        crop_size=0,  # the model's input size (older runs recorded another value here)
    )
    results, masks = {}, {}
    settings = {
        "float32": {"dtype": "float32"},
        "bfloat16": {"dtype": "bfloat16"},
        "bfloat16_exact_gelu": {"dtype": "bfloat16", "gelu": "exact"},
    }
    for name, overrides in settings.items():
        model = load_model(args.workdir, **overrides)
        cfg = data_config(data, model.config.img_size, batch_size=2)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        step = jax.jit(make_eval_step(graphdef, args.clicks))
        first = jax.jit(make_eval_step(graphdef, 1, return_predictions=True))
        dice, preds, seen = [], [], 0
        for batch in make_eval_dataset(cfg):
            inputs = {"image": batch["image"], "label": batch["label"]}
            out = step((params, rest), inputs, jax.random.key(args.seed))
            valid = np.asarray(batch["valid"])
            dice.append(np.asarray(out["dice_per_click"])[valid])
            # After the first click (same click for both dtypes; later clicks are drawn from
            # each run's own errors and may differ).
            preds.append(
                np.asarray(first((params, rest), inputs, jax.random.key(args.seed))["logits"])[
                    valid
                ]
                > 0
            )
            seen += int(valid.sum())
            if seen >= args.max_items:
                break
        d = np.concatenate(dice)
        results[name] = {f"dice_{c + 1}": float(np.nanmean(d[:, c])) for c in range(args.clicks)}
        masks[name] = np.concatenate(preds)
    a = masks["float32"]
    out = {
        "workdir": str(args.workdir),
        "seed": args.seed,
        "items": len(a),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
    }
    for name in ("bfloat16", "bfloat16_exact_gelu"):
        b = masks[name]
        inter = np.logical_and(a, b).sum()
        agreement = float(2 * inter / max(a.sum() + b.sum(), 1))
        out[f"click1_mask_agreement_dice_fp32_vs_{name}"] = agreement
        out[f"click1_mask_voxels_differing_fraction_{name}"] = float(np.mean(a != b))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
