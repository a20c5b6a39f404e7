"""Command line: ``python -m sammed3d_jax <command> ...``.

Commands:
  segment   segment one image from clicks (no ground truth needed)
  evaluate  interactive evaluation over a dataset (same as ``python evaluate.py``)

Input errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sammed3d_jax.eval.runner import CliArgumentParser, cli_errors

__all__ = ["main", "parse_point"]


def parse_point(text: str) -> tuple[float, float, float, int]:
    """``"X,Y,Z[,LABEL]"`` → ``(x, y, z, label)``; label defaults to 1 and must be 0 or 1."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4) or any(p == "" for p in parts):
        raise argparse.ArgumentTypeError(
            f"malformed point {text!r}: expected X,Y,Z or X,Y,Z,LABEL (e.g. 120,85,40,1)"
        )
    try:
        xyz = [float(p) for p in parts[:3]]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"malformed point {text!r}: coordinates must be numbers"
        ) from None
    if not all(abs(v) < float("inf") for v in xyz):
        raise argparse.ArgumentTypeError(f"malformed point {text!r}: coordinates must be finite")
    label = 1
    if len(parts) == 4:
        if parts[3] not in ("0", "1"):
            raise argparse.ArgumentTypeError(
                f"malformed point {text!r}: label must be 1 (foreground) or 0 (background)"
            )
        label = int(parts[3])
    return xyz[0], xyz[1], xyz[2], label


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment one image from clicks",
        description=(
            "Segment one 3D NIfTI image from clicks with a SAM-Med3D checkpoint. The mask is "
            "written on the input's exact grid (shape, affine, orientation). Clicks are voxel "
            "indices of the input file (i,j,k as nibabel reads it), or RAS millimetres with "
            "--mm."
        ),
    )
    p.add_argument("--image", required=True, type=Path, help="input image (.nii / .nii.gz)")
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="converted checkpoint dir or .pth file"
    )
    p.add_argument(
        "--point",
        required=True,
        action="append",
        type=parse_point,
        metavar="X,Y,Z[,LABEL]",
        help="a click; LABEL 1 = foreground (default), 0 = background; repeat for more",
    )
    p.add_argument("--mm", action="store_true", help="points are RAS millimetres")
    p.add_argument(
        "--tile", action="store_true", help="sliding windows for targets larger than one ROI"
    )
    p.add_argument("--max-windows", type=int, default=27, help="window limit with --tile")
    p.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="isotropic model-grid spacing in mm (default: the spacing a train.py run was "
        "trained on, else 1.5 as the released models)",
    )
    p.add_argument("--out", required=True, type=Path, help="output mask (.nii / .nii.gz)")
    p.add_argument("--png", type=Path, help="optional overlay PNG (three orthogonal slices)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out / --png file"
    )
    p.set_defaults(func=_segment)


def _segment(args: argparse.Namespace) -> int:
    import numpy as np

    from sammed3d_jax.checkpoint import load_model
    from sammed3d_jax.data.nifti import load_volume, save_mask
    from sammed3d_jax.eval.runner import resolve_spacing
    from sammed3d_jax.files import atomic_path, check_output_file
    from sammed3d_jax.inference.overlay import save_overlay_png
    from sammed3d_jax.inference.predictor import Predictor, PredictorError, check_clicks

    name = args.out.name.lower()
    if not (name.endswith(".nii.gz") or name.endswith(".nii")):
        raise PredictorError(f"--out {args.out}: the mask name must end in .nii or .nii.gz")
    if args.png is not None and args.png.suffix.lower() != ".png":
        raise PredictorError(f"--png {args.png}: the overlay name must end in .png")
    for flag, dst in (("--out", args.out), ("--png", args.png)):
        if dst is None:
            continue
        check_output_file(dst, flag, inputs=[args.image, args.checkpoint])
        if dst.exists() and not args.overwrite:
            raise PredictorError(f"{flag} {dst}: already exists (use --overwrite to replace it)")
    if args.max_windows < 1:
        raise PredictorError(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.spacing is not None and not args.spacing > 0:
        raise PredictorError(f"--spacing must be > 0, got {args.spacing}")
    image = load_volume(args.image, kind="image")
    points = np.array([p[:3] for p in args.point], dtype=np.float64)
    labels = np.array([p[3] for p in args.point], dtype=np.int64)
    if not (labels == 1).any():
        raise PredictorError("--point: at least one foreground click (label 1) is required")
    voxels, _, _ = check_clicks(image, points, labels, mm=args.mm)
    if not args.checkpoint.exists():
        raise PredictorError(f"--checkpoint {args.checkpoint}: no such file or directory")
    model = load_model(args.checkpoint)
    spacing = resolve_spacing(args.spacing, args.checkpoint)
    predictor = Predictor(model, spacing=spacing)
    predictor.set_image(image)
    if args.tile:
        result = predictor.predict_tiled(points, labels, mm=args.mm, max_windows=args.max_windows)
        mask = result.mask
        skipped = len(result.tiling.skipped_windows)
        detail = f"{len(result.tiling.windows)} window(s)" + (
            f", {skipped} skipped (ROI cannot be normalised)" if skipped else ""
        )
        if result.tiling.reached_max_windows:
            detail += ", window limit reached"
            print(
                f"warning: --max-windows {args.max_windows} reached: the target may go on "
                "past the segmented windows (raise --max-windows)",
                file=sys.stderr,
            )
    else:
        result = predictor.predict(points, labels, mm=args.mm)
        mask = result.mask
        dropped = int((~result.in_roi).sum())
        detail = f"ROI start {result.roi_start.tolist()}" + (
            f", {dropped} click(s) outside the ROI ignored" if dropped else ""
        )
    if args.png is None:
        save_mask(args.out, mask, image)
    else:
        # The overlay is drawn into its temporary name first and renamed only after the mask is
        # written: a failure in either leaves neither output, so a rerun needs no --overwrite.
        with atomic_path(args.png, suffix=".png") as png_tmp:
            save_overlay_png(
                png_tmp,
                image.array,
                image.affine,
                mask,
                voxels,
                labels,
                title=f"{args.image.name}: {int(mask.sum())} voxels",
            )
            save_mask(args.out, mask, image)
    grid = "x".join(f"{v:g}" for v in spacing)
    print(f"wrote {args.out}: {int(mask.sum())} foreground voxels, {detail}, {grid} mm grid")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from sammed3d_jax.eval.runner import add_arguments, run_from_args

    p = sub.add_parser(
        "evaluate",
        help="interactive evaluation over a dataset",
        description="Simulated-click evaluation of a checkpoint over a dataset folder.",
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def _attach_negative_points(argv: list[str]) -> list[str]:
    """``--point -12,3,4`` → ``--point=-12,3,4`` (argparse would take ``-12,...`` for an option)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--point" and i + 1 < len(argv) and re.match(r"^-[\d.]", argv[i + 1]):
            out.append(f"--point={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit status."""
    parser = CliArgumentParser(
        prog="python -m sammed3d_jax",
        description="SAM-Med3D in JAX: promptable 3D medical image segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_segment(sub)
    _add_evaluate(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(_attach_negative_points(argv))
    with cli_errors() as status:
        status.code = args.func(args)
    return status.code


if __name__ == "__main__":
    sys.exit(main())
