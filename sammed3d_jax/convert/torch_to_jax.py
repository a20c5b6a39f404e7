"""Mapping between PyTorch SAM-Med3D state dicts and Flax NNX parameters.

Every Flax leaf has exactly one PyTorch key: the module path is the same (NNX containers
`nnx.List` / `nnx.Dict` keep the upstream indices, e.g. `mask_downscaling.3`), and the leaf
name and layout change as follows:

| Flax leaf                      | PyTorch key suffix | layout change                        |
|--------------------------------|--------------------|--------------------------------------|
| Linear `kernel` (in, out)      | `weight` (out, in) | transpose                            |
| Conv3d `kernel` (kD,kH,kW,I,O) | `weight` (O,I,kD,kH,kW) | `PT_CONV3D_TO_FLAX`             |
| ConvTranspose3d `kernel` (kD,kH,kW,I,O) | `weight` (I,O,kD,kH,kW) | `PT_CONV_TRANSPOSE3D_TO_FLAX` |
| LayerNorm `scale`              | `weight`           | none                                 |
| Embedding `embedding`          | `weight`           | none                                 |
| `bias`, `pos_embed`, `rel_pos_*`, Fourier matrix | same name | none                          |

`infer_config` recovers the architecture from tensor shapes alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from sammed3d_jax.model.config import Sam3DConfig
from sammed3d_jax.model.sam import Sam3D, abstract_sam3d

PT_LINEAR_TO_FLAX = (1, 0)
PT_CONV3D_TO_FLAX = (2, 3, 4, 1, 0)  # (O, I, kD, kH, kW) -> (kD, kH, kW, I, O)
PT_CONV_TRANSPOSE3D_TO_FLAX = (2, 3, 4, 0, 1)  # (I, O, kD, kH, kW) -> (kD, kH, kW, I, O)
FLAX_TO_PT_CONV3D = tuple(np.argsort(PT_CONV3D_TO_FLAX))
FLAX_TO_PT_CONV_TRANSPOSE3D = tuple(np.argsort(PT_CONV_TRANSPOSE3D_TO_FLAX))

_RENAMED_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class ConversionError(ValueError):
    """A state dict does not match the model; the message lists every problem."""


def strip_prefix(
    state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")
) -> dict[str, Any]:
    """Remove wrapper prefixes that every key carries: DDP's ``module.`` and
    ``torch.compile``'s ``_orig_mod.``, in any nesting."""
    out = dict(state_dict)
    stripped = True
    while out and stripped:
        stripped = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                stripped = True
    return out


def _flat_leaves(tree: Any) -> dict[tuple, Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)
        flat[keys] = leaf
    return flat


def torch_key(path: tuple) -> str:
    """PyTorch state-dict key of a Flax parameter path."""
    *mods, leaf = path
    return ".".join([str(m) for m in mods] + [_RENAMED_LEAVES.get(leaf, leaf)])


def _kind(path: tuple, ndim: int) -> str:
    leaf = path[-1]
    if leaf != "kernel":
        return "plain"
    if ndim == 2:
        return "linear"
    if "output_upscaling" in path:
        return "conv_transpose"
    return "conv"


def to_flax_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return array.transpose(PT_LINEAR_TO_FLAX)
    if kind == "conv":
        return array.transpose(PT_CONV3D_TO_FLAX)
    if kind == "conv_transpose":
        return array.transpose(PT_CONV_TRANSPOSE3D_TO_FLAX)
    return array


def to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return array.transpose(PT_LINEAR_TO_FLAX)
    if kind == "conv":
        return array.transpose(FLAX_TO_PT_CONV3D)
    if kind == "conv_transpose":
        return array.transpose(FLAX_TO_PT_CONV_TRANSPOSE3D)
    return array


def expected_torch_shapes(cfg: Sam3DConfig) -> dict[str, tuple[int, ...]]:
    """Every PyTorch key of a model with this configuration and its PyTorch shape."""
    state = nnx.to_pure_dict(nnx.state(abstract_sam3d(cfg)))
    out = {}
    for path, leaf in _flat_leaves(state).items():
        kind = _kind(path, len(leaf.shape))
        shape = to_torch_layout(np.empty(leaf.shape, dtype=np.int8), kind).shape
        out[torch_key(path)] = tuple(shape)
    return out


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: key counts, the mapping and where the weights came from."""

    num_torch_keys: int
    num_flax_leaves: int
    num_parameters: int
    mapping: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def torch_to_flax_state(
    state_dict: Mapping[str, np.ndarray], cfg: Sam3DConfig
) -> tuple[dict, ConversionReport]:
    """Convert a PyTorch state dict into the nested pure dict of `nnx.state(Sam3D(cfg))`.

    Strict: every PyTorch key must be used and every Flax leaf filled with finite values of
    the right shape, otherwise `ConversionError` lists all missing, unexpected and mis-shaped
    (or non-finite) keys.
    """
    state_dict = strip_prefix(state_dict)
    target = nnx.to_pure_dict(nnx.state(abstract_sam3d(cfg)))
    flat_target = _flat_leaves(target)
    missing, misshaped, mapping = [], [], []
    filled: dict[tuple, np.ndarray] = {}
    used = set()
    for path, leaf in flat_target.items():
        key = torch_key(path)
        kind = _kind(path, len(leaf.shape))
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        arr = np.asarray(state_dict[key])
        expected_pt = to_torch_layout(np.empty(leaf.shape, dtype=np.int8), kind).shape
        if tuple(arr.shape) != tuple(expected_pt):
            misshaped.append(f"{key}: file {tuple(arr.shape)}, model {tuple(expected_pt)}")
            continue
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            misshaped.append(f"{key}: dtype {arr.dtype} is not floating point")
            continue
        value = arr.astype(np.float32)
        if not np.isfinite(value).all():
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            misshaped.append(f"{key}: {bad} of {value.size} values are NaN or infinite")
            continue
        filled[path] = np.ascontiguousarray(to_flax_layout(value, kind))
        mapping.append(
            {
                "torch": key,
                "flax": "/".join(map(str, path)),
                "torch_shape": list(arr.shape),
                "flax_shape": list(leaf.shape),
                "layout": kind,
            }
        )
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or misshaped:
        lines = []
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped or non-finite keys", misshaped),
        ):
            if items:
                lines.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
        raise ConversionError(
            "state dict does not match the model configuration:\n" + "\n".join(lines)
        )
    nested = _unflatten(filled)
    num_params = sum(
        v.size for p, v in filled.items() if p[-1] != "positional_encoding_gaussian_matrix"
    )
    report = ConversionReport(
        num_torch_keys=len(state_dict),
        num_flax_leaves=len(filled),
        num_parameters=int(num_params),
        mapping=mapping,
    )
    return nested, report


def flax_state_to_torch(state: Any) -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax_state`: an ordered float32 PyTorch-layout state dict."""
    flat = _flat_leaves(nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state)
    out = {}
    for path, leaf in flat.items():
        arr = np.asarray(leaf, dtype=np.float32)
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(arr, _kind(path, arr.ndim)))
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    root: dict = {}
    for path, value in flat.items():
        node = root
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return root


def _count(prefix_re: str, keys) -> int:
    pat = re.compile(prefix_re)
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if found and found != set(range(len(found))):
        raise ConversionError(f"non-contiguous indices for {prefix_re}: {sorted(found)}")
    return len(found)


def _ratio_for(hidden: int, dim: int) -> float:
    """The float ``r`` closest to ``hidden / dim`` with ``int(dim * r) == hidden``, the width
    the model rebuilds (the plain quotient can land one ulp short and truncate)."""
    r = hidden / dim
    while int(dim * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


def infer_config(state_dict: Mapping[str, Any], **overrides: Any) -> Sam3DConfig:
    """Recover the architecture from tensor shapes.

    Widths, depths, heads (from the relative-position tables), window size and global
    blocks, patch and image size, prompt width, mask/IoU head sizes are all read from the
    shapes. Values that no shape records (decoder heads, LayerNorm eps) keep the original's
    fixed values unless given in `overrides`.
    """
    sd = strip_prefix(state_dict)
    keys = list(sd)

    def shape(k: str, ndim: int | None = None) -> tuple[int, ...]:
        if k not in sd:
            raise ConversionError(f"cannot infer the architecture: key {k!r} is missing")
        s = tuple(np.shape(sd[k]))
        if ndim is not None and (len(s) != ndim or 0 in s):
            raise ConversionError(f"{k} has shape {s}; expected {ndim} non-empty dimensions")
        return s

    pe_w = shape("image_encoder.patch_embed.proj.weight")
    if len(pe_w) != 5 or pe_w[2] != pe_w[3] or pe_w[3] != pe_w[4]:
        raise ConversionError(
            f"image_encoder.patch_embed.proj.weight has shape {pe_w}; expected a cubic Conv3d kernel"
        )
    embed, in_chans, patch = pe_w[0], pe_w[1], pe_w[2]
    depth = _count(r"image_encoder\.blocks\.(\d+)\.", keys)
    if depth == 0:
        raise ConversionError("cannot infer the architecture: no image_encoder.blocks.* keys")
    use_abs_pos = "image_encoder.pos_embed" in sd
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_d" in sd
    grid = None
    if use_abs_pos:
        pos = shape("image_encoder.pos_embed", 5)
        grid = pos[1]
    sides = []
    if use_rel_pos:
        for i in range(depth):
            sides.append((shape(f"image_encoder.blocks.{i}.attn.rel_pos_d", 2)[0] + 1) // 2)
        head_dim = shape("image_encoder.blocks.0.attn.rel_pos_d", 2)[1]
        if embed % head_dim:
            raise ConversionError(
                f"image_encoder.blocks.0.attn.rel_pos_d has {head_dim} columns, which do not "
                f"divide the embedding width {embed}"
            )
        heads = embed // head_dim
    else:
        heads = overrides.pop("encoder_num_heads", None)
        if heads is None:
            raise ConversionError(
                "the checkpoint has no relative-position tables, so the number of heads cannot "
                "be read from it; pass encoder_num_heads"
            )
    if grid is None:
        grid = overrides.get("img_size", 0) // patch if "img_size" in overrides else None
        if grid is None:
            # Without absolute positions the tables give the global blocks' grid and the
            # windowed blocks' window, but not which is which (vit_b_ori's window 14 exceeds
            # its grid 8): only a single table size is unambiguous.
            if not sides:
                raise ConversionError("cannot infer img_size from this checkpoint; pass img_size")
            if len(set(sides)) > 1:
                raise ConversionError(
                    "the checkpoint has no pos_embed, so its token grid cannot be told apart "
                    f"from its window size (relative-position tables span {sorted(set(sides))} "
                    "tokens); pass img_size (convert_torch_weights.py --img-size)"
                )
            grid = sides[0]
    global_idx = tuple(i for i, s in enumerate(sides) if s == grid)
    windowed = {s for s in sides if s != grid}
    if len(windowed) > 1:
        raise ConversionError(f"windowed blocks have different window sizes {sorted(windowed)}")
    window = windowed.pop() if windowed else 0
    if not use_rel_pos:
        window = overrides.pop("window_size", 0)
        global_idx = tuple(overrides.pop("encoder_global_attn_indexes", ()))
    lin1 = shape("image_encoder.blocks.0.mlp.lin1.weight", 2)
    prompt_dim = shape("image_encoder.neck.0.weight", 5)[0]
    mask_in = shape("prompt_encoder.mask_downscaling.3.weight", 5)[0]
    mask_tokens = shape("mask_decoder.mask_tokens.weight", 2)[0]
    iou_depth = _count(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight", keys)
    iou_hidden = shape("mask_decoder.iou_prediction_head.layers.0.weight", 2)[0]
    dec_depth = _count(r"mask_decoder\.transformer\.layers\.(\d+)\.", keys)
    dec_mlp = shape("mask_decoder.transformer.layers.0.mlp.lin1.weight", 2)[0]
    cross = shape("mask_decoder.transformer.final_attn_token_to_image.q_proj.weight", 2)[0]
    fields = dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        encoder_embed_dim=embed,
        encoder_depth=depth,
        encoder_num_heads=heads,
        mlp_ratio=_ratio_for(lin1[0], embed),
        encoder_global_attn_indexes=global_idx,
        window_size=window,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
        use_abs_pos=use_abs_pos,
        use_rel_pos=use_rel_pos,
        prompt_embed_dim=prompt_dim,
        mask_in_chans=mask_in,
        num_multimask_outputs=mask_tokens - 1,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=iou_hidden,
        decoder_depth=dec_depth,
        decoder_mlp_dim=dec_mlp,
        attention_downsample_rate=max(prompt_dim // cross, 1),
    )
    fields.update(overrides)
    try:
        return Sam3DConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"inferred architecture is invalid: {e}") from e


def load_torch_state_into(model: Sam3D, state_dict: Mapping[str, np.ndarray]) -> ConversionReport:
    """Fill `model`'s parameters in place from a PyTorch state dict (strict)."""
    nested, report = torch_to_flax_state(state_dict, model.config)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jax.numpy.asarray, nested))
    nnx.update(model, state)
    return report
