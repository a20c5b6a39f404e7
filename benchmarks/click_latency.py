"""Latency of interactive SAM-Med3D inference: encode once, then one decode per click.

    python benchmarks/click_latency.py --variant vit_b_ori            # random weights
    python benchmarks/click_latency.py --checkpoint CKPT              # converted dir or .pth

Measured on a synthetic image (noisy background with a bright ellipsoid, 1 mm grid) with the
public :class:`sammed3d_jax.inference.Predictor`:

* ``set_image_s``: resampling to 1.5 mm and re-orientation (once per image);
* ``encode_s``: the image encoder on one ``S³`` ROI (once per ROI);
* ``decode_s``: prompt encoder + mask decoder + upsampling for one click set;
* ``predict_s``: a whole ``Predictor.predict`` call for click k = 1..N with the embedding
  cached (decode, thresholding and paste-back onto the original grid).

Compilation is excluded: every measured call runs after a warm-up call of the same shape;
the reported values are medians over ``--repeats`` runs. The last line printed is one JSON
object with all numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import nnx

from sammed3d_jax.data import Volume
from sammed3d_jax.inference import Predictor
from sammed3d_jax.model import VARIANTS, Sam3DConfig, abstract_sam3d


def random_model(variant: str, seed: int = 0):
    """A model of ``variant`` with random weights, filled from NumPy (no slow jax init).

    Kernels and embeddings ~ N(0, 0.02²), LayerNorm scales 1, biases 0: timing does not
    depend on the values.
    """
    cfg = Sam3DConfig.from_variant(variant)
    model = abstract_sam3d(cfg)
    state = nnx.state(model)
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(x.shape, np.float32)
        if name == "bias":
            return np.zeros(x.shape, np.float32)
        return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)

    pure = jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jax.numpy.asarray, pure))
    nnx.update(model, state)
    return model


def synthetic_image(shape=(200, 200, 160), seed: int = 0) -> Volume:
    """A positive-valued volume (1 mm, RAS) with a bright ellipsoid in the middle."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    centre = [s / 2 for s in shape]
    r = sum(((g - c) / (s / 6)) ** 2 for g, c, s in zip(grid, centre, shape))
    array = (200 + 30 * rng.standard_normal(shape) + 400 * (r <= 1)).astype(np.float32)
    return Volume(array=np.clip(array, 1, None), affine=np.eye(4))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b_ori", choices=sorted(VARIANTS))
    parser.add_argument("--checkpoint", type=Path, help="use these weights instead")
    parser.add_argument("--clicks", type=int, default=6, help="clicks per session (6)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clicks < 1 or args.repeats < 1:
        parser.error("--clicks and --repeats must be >= 1")

    t0 = time.perf_counter()
    if args.checkpoint is not None:
        from sammed3d_jax.checkpoint import load_model

        model = load_model(args.checkpoint)
        source = str(args.checkpoint)
    else:
        model = random_model(args.variant, args.seed)
        source = f"{args.variant} (random weights)"
    load_s = time.perf_counter() - t0
    cfg = model.config
    print(f"model: {source}, img_size {cfg.img_size}, width {cfg.encoder_embed_dim}", flush=True)

    predictor = Predictor(model)
    image = synthetic_image(seed=args.seed)
    t0 = time.perf_counter()
    predictor.set_image(image)
    set_image_s = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed)
    centre = np.array(image.shape) / 2
    clicks = centre + rng.uniform(-12, 12, size=(args.clicks, 3))
    labels = (np.arange(args.clicks) % 3 != 2).astype(int)  # mostly positive
    clicks[0] = centre

    # Warm-up: compiles the encoder and every decoder bucket used, and caches the ROI.
    t0 = time.perf_counter()
    prev = None
    for k in range(1, args.clicks + 1):
        prev = predictor.predict(clicks[:k], labels[:k], prev)
    warmup_s = time.perf_counter() - t0
    engine = predictor.engine
    start = prev.roi_start
    from sammed3d_jax.data import crop_or_pad, znormalize

    roi = znormalize(crop_or_pad(predictor.canonical_image, start, engine.crop_size))[0]
    encode_s = _median_time(lambda: engine.encode(roi), args.repeats)
    emb, _ = predictor._embedding(start)
    points_roi = prev.points_roi[:1]
    decode_s = _median_time(lambda: engine.decode(emb, points_roi, labels[:1]), args.repeats)

    per_click: list[list[float]] = [[] for _ in range(args.clicks)]
    for _ in range(args.repeats):
        prev = None
        predictor.reset()
        for k in range(1, args.clicks + 1):
            t0 = time.perf_counter()
            prev = predictor.predict(clicks[:k], labels[:k], prev)
            per_click[k - 1].append(time.perf_counter() - t0)
            assert not prev.encoded
    predict_median = [statistics.median(v) for v in per_click]

    result = {
        "variant": args.variant if args.checkpoint is None else None,
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "img_size": cfg.img_size,
        "image_shape": list(image.shape),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "repeats": args.repeats,
        "model_load_s": round(load_s, 4),
        "set_image_s": round(set_image_s, 4),
        "warmup_s": round(warmup_s, 4),
        "encode_s": round(encode_s, 4),
        "decode_s": round(decode_s, 4),
        "predict_s_per_click": [round(v, 4) for v in predict_median],
        "predict_s": round(statistics.median(predict_median), 4),
    }
    print(
        f"encode {encode_s * 1e3:.1f} ms (once per ROI), decode {decode_s * 1e3:.1f} ms, "
        f"predict per click {result['predict_s'] * 1e3:.1f} ms (median over clicks 1..{args.clicks})"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
