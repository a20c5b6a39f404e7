"""Convert SAM-Med3D PyTorch weights to a Flax/Orbax checkpoint, and back.

    python convert_torch_weights.py IN.pth OUT_DIR [--verify] [--overwrite]
    python convert_torch_weights.py --export CKPT_DIR OUT.pth [--bare]

IN.pth may be a bare state dict, a training checkpoint of the original (`model_state_dict`
plus optimizer state, an `argparse.Namespace`, ...) or a DDP state dict (`module.` keys). It
is read without PyTorch and nothing in it is executed: only tensors, plain containers and a
few inert types are accepted. The architecture is inferred from the tensor shapes and saved
next to the weights. Conversion is strict: any missing, unexpected or mis-shaped key stops it
with a list, and nothing is written.

--verify runs the converted model against a PyTorch reference (medim's SAM-Med3D modules,
loaded from the same file) on random inputs and prints max abs/rel differences per output.
--export writes a converted checkpoint back to a `.pth` that medim and the original load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sammed3d_jax.checkpoint import (
    CheckpointError,
    export_pth,
    load_model,
    model_from_state_dict,
    read_torch_checkpoint,
    require_known_architecture,
    save_model,
    sha256_file,
)
from sammed3d_jax.convert.pth import PthError
from sammed3d_jax.convert.torch_to_jax import ConversionError, infer_config
from sammed3d_jax.convert.verify import ReferenceUnavailableError
from sammed3d_jax.eval.runner import CliArgumentParser
from sammed3d_jax.files import check_output_file
from sammed3d_jax.model.config import VARIANTS, matching_variant


def convert(
    src: Path,
    out_dir: Path,
    overwrite: bool = False,
    img_size: int | None = None,
    allow_custom_architecture: bool = False,
) -> dict:
    state_dict, info = read_torch_checkpoint(src)
    overrides = {} if img_size is None else {"img_size": img_size}
    try:
        cfg = infer_config(state_dict, **overrides)
        if not allow_custom_architecture:
            require_known_architecture(cfg)
        model, conv = model_from_state_dict(state_dict, cfg)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from e
    variant = matching_variant(model.config)
    if variant is None:
        print(
            f"warning: {src}: a custom architecture (no known variant: "
            f"{', '.join(sorted(VARIANTS))}); check the summary below",
            file=sys.stderr,
        )
    report = {
        "source": str(src.resolve()),
        "source_sha256": sha256_file(src),
        **info,
        "config": model.config.to_dict(),
        **conv.to_dict(),
    }
    save_model(model, out_dir, report, overwrite=overwrite)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = CliArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="IN.pth (or CKPT_DIR with --export)")
    parser.add_argument("dst", type=Path, help="OUT_DIR (or OUT.pth with --export)")
    parser.add_argument("--verify", action="store_true", help="compare with a PyTorch reference")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--export", action="store_true", help="Flax checkpoint -> .pth")
    parser.add_argument("--bare", action="store_true", help="with --export: bare state dict")
    parser.add_argument("--seed", type=int, default=None, help="random inputs for --verify (0)")
    parser.add_argument(
        "--allow-custom-architecture",
        action="store_true",
        help="convert weights whose architecture is no known variant (otherwise refused: a "
        "checkpoint missing whole blocks would convert as a smaller model)",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input side (only needed for checkpoints without pos_embed whose grid and "
        "window cannot be told apart)",
    )
    args = parser.parse_args(argv)
    try:
        if args.bare and not args.export:
            raise CheckpointError("--bare applies to --export only")
        if args.seed is not None and not args.verify:
            raise CheckpointError("--seed applies to --verify only")
        if args.export:
            if args.dst.exists() and not args.overwrite:
                raise CheckpointError(f"{args.dst} already exists (use --overwrite)")
            try:
                check_output_file(args.dst, "OUT.pth", inputs=[args.src])
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            src = args.src.resolve()
            if args.src.is_dir() and src in args.dst.resolve().parents:
                raise CheckpointError(
                    f"OUT.pth {args.dst}: inside the checkpoint being exported ({args.src}); "
                    "choose a path outside it"
                )
            model = load_model(args.src)
            export_pth(model, args.dst, bare=args.bare)
            print(f"wrote {args.dst} ({'bare state dict' if args.bare else 'model_state_dict'})")
            return 0
        if args.src.is_dir():
            raise CheckpointError(
                f"{args.src}: is a folder; converting reads a .pth file (--export writes a "
                "converted folder as a .pth)"
            )
        if not args.src.is_file():
            raise CheckpointError(f"{args.src}: no such file")
        if args.dst.exists() and args.dst.resolve() == args.src.resolve():
            raise CheckpointError(f"{args.dst}: the output would replace the source checkpoint")
        if args.dst.exists() and not args.overwrite:
            raise CheckpointError(f"{args.dst} already exists (use --overwrite)")
        if args.verify:  # before converting: a missing reference must not leave OUT_DIR
            from sammed3d_jax.convert.verify import require_reference

            require_reference()
        if args.img_size is not None and args.img_size < 1:
            raise CheckpointError(f"--img-size must be >= 1, got {args.img_size}")
        report = convert(
            args.src,
            args.dst,
            overwrite=args.overwrite,
            img_size=args.img_size,
            allow_custom_architecture=args.allow_custom_architecture,
        )
        cfg = report["config"]
        print(
            f"converted {args.src} -> {args.dst}: {report['num_torch_keys']} keys, "
            f"{report['num_parameters']:,} parameters, weights at {report['weights_found_at']}"
        )
        print(
            "architecture: "
            + ", ".join(
                f"{k}={cfg[k]}"
                for k in (
                    "img_size",
                    "patch_size",
                    "encoder_embed_dim",
                    "encoder_depth",
                    "encoder_num_heads",
                    "window_size",
                    "encoder_global_attn_indexes",
                    "prompt_embed_dim",
                )
            )
        )
        if args.verify:
            from sammed3d_jax.convert.verify import verify_against_torch

            result = verify_against_torch(args.src, args.dst, seed=args.seed or 0)
            for name, v in result["outputs"].items():
                flag = "ok" if v["ok"] else "FAIL"
                print(
                    f"  {name:24s} max_abs {v['max_abs']:.3e}  max_rel {v['max_rel']:.3e}  {flag}"
                )
            print(json.dumps(result))
            return 0 if result["ok"] else 1
        return 0
    except (PthError, ConversionError, CheckpointError, ReferenceUnavailableError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
