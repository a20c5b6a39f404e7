"""Numerical parity against outputs of the original PyTorch SAM-Med3D.

    python -m sammed3d_jax.parity GOLDEN_DIR [GOLDEN_DIR ...]

A golden folder holds `io.npz` (inputs and reference outputs, PyTorch layouts) and either
PyTorch checkpoints (`*.pth`, bare state dict or training format) or a `weight_recipe.json`
that regenerates the weights with numpy. Every checkpoint is converted with the same code
as `convert_torch_weights.py`, every case is run in float32 at the highest matmul precision,
and every stored output (final and intermediate) is compared. The last printed line is one
JSON object; the exit code is 1 when any output's max_rel = max|ours - ref| / max|ref|
exceeds the tolerance (1e-4; 3e-4 for the full-size vit_b_ori).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zipfile import BadZipFile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sammed3d_jax.convert.pth import PthError
from sammed3d_jax.convert.torch_to_jax import infer_config, torch_to_flax_state
from sammed3d_jax.model.config import VARIANTS, Sam3DConfig
from sammed3d_jax.model.sam import Sam3D

TOLERANCE = 1e-4
TOLERANCE_VIT_B_ORI = 3e-4


class GoldenFormatError(ValueError):
    """A golden folder is missing files or does not follow a known layout."""


# ---------------------------------------------------------------------------------------
# Weight sources


def recipe_state_dict(recipe: dict[str, Any], check_hashes: bool = True) -> dict[str, np.ndarray]:
    """Regenerate a state dict from a `weight_recipe.json` (numpy only).

    Key i gets ``default_rng(i).standard_normal(shape)`` (float64), scaled by its kind and
    cast once to float32; rank-1 `.weight` keys (LayerNorm weights) get 1 + scale * x.
    """
    out = {}
    for entry in recipe["keys"]:
        shape = tuple(entry["shape"])
        x = np.random.default_rng(int(entry["rng_seed"])).standard_normal(size=shape)
        value = float(entry["scale"]) * x
        if entry["kind"] == "norm_weight":
            value = 1.0 + value
        arr = value.astype(np.float32)
        if check_hashes and "sha256" in entry:
            digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
            if digest != entry["sha256"]:
                raise GoldenFormatError(f"recipe weight {entry['key']} does not match its sha256")
        out[entry["key"]] = arr
    return out


def recipe_image(recipe: dict[str, Any]) -> np.ndarray:
    spec = recipe["image"]
    img = np.random.default_rng(int(spec["rng_seed"])).standard_normal(size=tuple(spec["shape"]))
    img = img.astype(np.float32)
    if "sha256_of_c_order_bytes" in spec:
        if hashlib.sha256(img.tobytes()).hexdigest() != spec["sha256_of_c_order_bytes"]:
            raise GoldenFormatError("regenerated recipe image does not match its sha256")
    return img


def weight_sources(folder: Path) -> Iterator[tuple[str, Callable[[], dict[str, np.ndarray]]]]:
    """(name, loader) for every set of weights in a golden folder."""
    from sammed3d_jax.convert.pth import find_state_dict, load_pth

    recipe = folder / "weight_recipe.json"
    if recipe.exists():
        yield "weight_recipe.json", lambda: recipe_state_dict(json.loads(recipe.read_text()))
    for pth in sorted(folder.glob("*.pth")):
        yield pth.name, lambda p=pth: find_state_dict(load_pth(p))[0]


# ---------------------------------------------------------------------------------------
# Cases


def _nchw(x: jax.Array) -> np.ndarray:
    """Channels-last (B, D, H, W, C) -> PyTorch's (B, C, D, H, W)."""
    return np.asarray(x).transpose(0, 4, 1, 2, 3)


def _volume(image: np.ndarray) -> jax.Array:
    """(B, C, D, H, W) -> (B, D, H, W, C)."""
    return jnp.asarray(image.transpose(0, 2, 3, 4, 1))


class Runner:
    """Runs the model pieces under jit and collects outputs named like the golden arrays."""

    def __init__(self, model: Sam3D):
        self.model = model
        graphdef, state = nnx.split(model)

        @jax.jit
        def encode(state, volume):
            m = nnx.merge(graphdef, state)
            enc = m.image_encoder
            x = enc.embed_patches(volume)
            blocks = [x]
            for blk in enc.blocks:
                x = blk(x)
                blocks.append(x)
            return enc.neck_forward(x), blocks

        @jax.jit
        def prompts(state, points, labels, mask):
            m = nnx.merge(graphdef, state)
            pts = None if points is None else (points, labels)
            sparse, dense, _ = m.prompt_encoder(pts, mask, batch_size=None)
            return sparse, dense, m.prompt_encoder.get_dense_pe()

        def decode(state, emb, pe, sparse, dense, multimask):
            m = nnx.merge(graphdef, state)
            masks, iou, inter = m.mask_decoder.predict_masks(
                emb, pe, sparse, dense, return_intermediates=True
            )
            sl = slice(1, None) if multimask else slice(0, 1)
            return masks[:, sl], iou[:, sl], inter

        self._state = state
        self._encode = encode
        self._prompts = prompts
        self._decode = jax.jit(decode, static_argnums=5)

    def encode(self, image: np.ndarray, prefix: str, out: dict[str, np.ndarray]):
        emb, blocks = self._encode(self._state, _volume(image))
        out[f"{prefix}image_embedding"] = _nchw(emb)
        out[f"{prefix}patch_embed_plus_pos"] = np.asarray(blocks[0])
        for i, b in enumerate(blocks[1:]):
            out[f"{prefix}block_{i}"] = np.asarray(b)
        return emb

    def decode(self, emb, points, labels, mask, multimask: bool, prefix: str, out: dict):
        pts = None if points is None else jnp.asarray(points)
        lab = None if labels is None else jnp.asarray(labels)
        msk = None if mask is None else jnp.asarray(mask[:, 0])
        sparse, dense, pe = self._prompts(self._state, pts, lab, msk)
        if points is None:  # the original's empty sparse tensor when no points are given
            sparse = jnp.zeros((dense.shape[0], 0, sparse.shape[-1]), jnp.float32)
        low, iou, inter = self._decode(self._state, emb, pe, sparse, dense, multimask)
        size = self.model.config.img_size
        full = np.asarray(self.model_full_res(low, size))
        out.update(
            {
                f"{prefix}sparse": np.asarray(sparse),
                f"{prefix}dense": _nchw(dense),
                f"{prefix}dense_pe": _nchw(pe),
                f"{prefix}low_res_masks": np.asarray(low),
                f"{prefix}iou": np.asarray(iou),
                f"{prefix}full_res_logits": full,
                f"{prefix}full_res_logits_sub3": full[..., ::3, ::3, ::3],
                f"{prefix}dec_transformer_queries": np.asarray(inter["transformer_queries"]),
                f"{prefix}dec_transformer_keys": np.asarray(inter["transformer_keys"]),
                f"{prefix}dec_upscaled_embedding": _nchw(inter["upscaled_embedding"]),
            }
        )
        return low

    @staticmethod
    def model_full_res(low, size):
        from sammed3d_jax.model.common import upsample_logits

        return upsample_logits(low, size)


def run_case_format(runner: Runner, io: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Folders whose arrays are named `case<k>_*` (the layout of golden/small).

    Case k uses its own image, points and mask input where stored. By the layout's
    definition, case 3 reuses case 1's image and prompts with multimask output, and case 4
    decodes case 2's image with no points and case 2's mask input.
    """
    out: dict[str, np.ndarray] = {}
    ks = sorted({int(n[4:].split("_")[0]) for n in io if n.startswith("case")})
    embs: dict[int, Any] = {}
    for k in ks:
        p = f"case{k}_"
        source = {3: 1, 4: 2}.get(k, k) if f"{p}image" not in io else k
        if source not in embs:
            embs[source] = runner.encode(io[f"case{source}_image"], f"case{source}_", out)
        if k == 4 and f"{p}points" not in io:
            points = labels = None
        else:
            src = k if f"{p}points" in io else source
            points, labels = io[f"case{src}_points"], io[f"case{src}_labels"]
        mask = io.get(f"{p}mask_input")
        if mask is None and k == 4:
            mask = io.get("case2_mask_input")
        runner.decode(embs[source], points, labels, mask, k == 3, p, out)
    return out


def run_call_format(runner: Runner, io: dict[str, np.ndarray], image: np.ndarray) -> dict:
    """Folders whose arrays are named `call<k>_*` (the layout of golden/vit_b_ori).

    One image, encoded once; call 1 has no mask input, call k > 1 feeds call k-1's raw
    low-res logits back as the mask input (the original's iterative-click pattern).
    """
    out: dict[str, np.ndarray] = {}
    if "image_subsample_s8" in io:
        out["image_subsample_s8"] = image[:, :, ::8, ::8, ::8]
    emb = runner.encode(image, "", out)
    for name in [k for k in list(out) if k.startswith(("block_", "patch_embed_plus_pos"))]:
        out[f"{name}_c96"] = out[name][..., ::96]
    ks = sorted({int(n[4:].split("_")[0]) for n in io if n.startswith("call")})
    prev = None
    for k in ks:
        p = f"call{k}_"
        prev = runner.decode(emb, io[f"{p}points"], io[f"{p}labels"], prev, False, p, out)
        prev = np.asarray(prev)
        out.setdefault("dense_pe", out[f"{p}dense_pe"])
    return out


# ---------------------------------------------------------------------------------------
# Comparison


def compare(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], skip: set[str]) -> dict:
    """Per stored output: max_abs and max_rel (max_abs / max|ref|)."""
    result = {}
    for name in sorted(ref):
        if name in skip:
            continue
        if name not in ours:
            raise GoldenFormatError(f"io.npz array {name!r} is not produced by any known case")
        a, r = np.asarray(ours[name], np.float64), np.asarray(ref[name], np.float64)
        if a.shape != r.shape:
            raise GoldenFormatError(f"{name}: shape {a.shape} vs golden {r.shape}")
        if r.size == 0:
            result[name] = {"max_abs": 0.0, "max_rel": 0.0}
            continue
        max_abs = float(np.max(np.abs(a - r)))
        scale = float(np.max(np.abs(r)))
        result[name] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}
    return result


def _inputs(io: dict[str, np.ndarray]) -> set[str]:
    names = set()
    for n in io:
        if n.endswith(("_image", "_points", "_labels", "_mask_input")) or n == "image_subsample_s8":
            names.add(n)
    return names


FINAL_OUTPUTS = ("low_res_masks", "iou")


def _check_final_outputs(io_path: Path, io: dict[str, np.ndarray]) -> None:
    """Every case/call of the golden file must hold its final outputs: a file with inputs
    only (or none) would otherwise pass with nothing compared."""
    groups = sorted({n.split("_", 1)[0] for n in io if re.match(r"(case|call)\d+_", n)})
    missing = [f"{g}_{o}" for g in groups for o in FINAL_OUTPUTS if f"{g}_{o}" not in io]
    if not groups or missing:
        raise GoldenFormatError(
            f"{io_path}: no reference outputs to compare"
            + (f" (missing {', '.join(missing)})" if missing else " (no case or call arrays)")
        )


def check_folder(folder: Path, window_attention: str = "exact") -> dict[str, Any]:
    """Convert every checkpoint of a golden folder, run its cases and compare."""
    folder = Path(folder)
    io_path = folder / "io.npz"
    if not io_path.exists():
        raise GoldenFormatError(f"{folder}: no io.npz")
    with np.load(io_path) as z:
        io = {k: z[k] for k in z.files}
    _check_final_outputs(io_path, io)
    sources = list(weight_sources(folder))
    if not sources:
        raise GoldenFormatError(f"{folder}: no *.pth checkpoint and no weight_recipe.json")
    report: dict[str, Any] = {"golden": str(folder), "checkpoints": {}}
    ok = True
    for name, load in sources:
        t0 = time.time()
        state_dict = load()
        cfg = infer_config(state_dict).replace(window_attention=window_attention)
        _check_declared_config(folder, cfg)
        tol = TOLERANCE_VIT_B_ORI if _is_vit_b_ori(cfg) else TOLERANCE
        nested, conv = torch_to_flax_state(state_dict, cfg)
        del state_dict
        model = nnx.eval_shape(lambda c=cfg: Sam3D(c, rngs=nnx.Rngs(0)))
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, nested))
        nnx.update(model, state)
        del nested
        with jax.default_matmul_precision("highest"):
            runner = Runner(model)
            if any(n.startswith("case") for n in io):
                ours = run_case_format(runner, io)
            else:
                recipe = json.loads((folder / "weight_recipe.json").read_text())
                ours = run_call_format(runner, io, recipe_image(recipe))
        outputs = compare(ours, io, skip=_inputs(io))
        for v in outputs.values():
            v["ok"] = v["max_rel"] <= tol
        if "image_subsample_s8" in io:  # the recipe's input image itself: must be bitwise
            outputs["image_subsample_s8"] = compare(
                {"x": ours["image_subsample_s8"]}, {"x": io["image_subsample_s8"]}, set()
            )["x"] | {
                "ok": bool(np.array_equal(ours["image_subsample_s8"], io["image_subsample_s8"]))
            }
        ck_ok = all(v["ok"] for v in outputs.values())
        ok &= ck_ok
        report["checkpoints"][name] = {
            "config": cfg.to_dict(),
            "num_parameters": conv.num_parameters,
            "tolerance_max_rel": tol,
            "outputs": outputs,
            "ok": ck_ok,
            "seconds": round(time.time() - t0, 2),
        }
    report["ok"] = ok
    return report


def _is_vit_b_ori(cfg: Sam3DConfig) -> bool:
    ref = VARIANTS["vit_b_ori"]
    return cfg.replace(window_attention=ref.window_attention) == ref


def _check_declared_config(folder: Path, cfg: Sam3DConfig) -> None:
    """If the folder has a config.json, the inferred architecture must agree with it."""
    path = folder / "config.json"
    if not path.exists():
        return
    declared = json.loads(path.read_text()).get("image_encoder", {})
    pairs = {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.encoder_embed_dim,
        "depth": cfg.encoder_depth,
        "num_heads": cfg.encoder_num_heads,
        "out_chans": cfg.prompt_embed_dim,
        "window_size": cfg.window_size,
        "global_attn_indexes": list(cfg.encoder_global_attn_indexes),
    }
    bad = {k: (declared[k], v) for k, v in pairs.items() if k in declared and declared[k] != v}
    if bad:
        raise GoldenFormatError(f"{path}: declared vs inferred architecture differ: {bad}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sammed3d_jax.parity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folders", nargs="+", type=Path, help="golden folders")
    parser.add_argument(
        "--window-attention",
        choices=("exact", "padded"),
        default="exact",
        help="windowed-block implementation to check (default: exact)",
    )
    args = parser.parse_args(argv)
    reports = []
    for folder in args.folders:
        try:
            rep = check_folder(folder, args.window_attention)
        except (GoldenFormatError, OSError, ValueError, KeyError, PthError, BadZipFile) as e:
            # A damaged folder is reported and the remaining folders still run.
            message = f"missing array {e}" if isinstance(e, KeyError) else str(e)
            print(f"error: {folder}: {message}", file=sys.stderr)
            rep = {"golden": str(folder), "ok": False, "error": message}
        reports.append(rep)
        for ck, r in rep.get("checkpoints", {}).items():
            print(
                f"{folder} :: {ck} (tolerance max_rel {r['tolerance_max_rel']:g}, {r['seconds']} s)"
            )
            for name, v in r["outputs"].items():
                flag = "ok" if v["ok"] else "FAIL"
                print(
                    f"  {name:34s} max_abs {v['max_abs']:.3e}  max_rel {v['max_rel']:.3e}  {flag}"
                )
    ok = all(r["ok"] for r in reports)
    summary = {
        "ok": ok,
        "folders": [
            {
                "golden": r["golden"],
                "ok": r["ok"],
                **({"error": r["error"]} if "error" in r else {}),
                "checkpoints": {
                    ck: {
                        "ok": v["ok"],
                        "outputs": {
                            n: {k: o[k] for k in ("max_abs", "max_rel", "ok")}
                            for n, o in v["outputs"].items()
                        },
                    }
                    for ck, v in r.get("checkpoints", {}).items()
                },
            }
            for r in reports
        ],
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
