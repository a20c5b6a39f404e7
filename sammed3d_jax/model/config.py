"""Model hyper-parameters: a frozen `Sam3DConfig` plus the upstream registry variants.

Every constructor argument of the original `ImageEncoderViT3D`, `PromptEncoder3D` and
`MaskDecoder3D` that changes the architecture is a field here, so any configuration the
original code can build can be built here too. Values hard-coded in the original (decoder
transformer depth/heads/MLP width, attention downsample rate) are fields with those defaults.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

WindowAttention = Literal["exact", "padded"]
AttentionImpl = Literal["auto", "einsum", "xla", "cudnn", "pallas"]
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "pallas")
GeluForm = Literal["auto", "exact", "tanh"]
# Fields that change how the model computes, never which parameters it has: they may be
# overridden when loading a checkpoint.
NUMERIC_FIELDS = ("dtype", "window_attention", "attention_impl", "remat", "gelu")


@dataclasses.dataclass(frozen=True)
class Sam3DConfig:
    """Architecture and numerics of a SAM-Med3D model.

    Attributes:
      img_size: side of the cubic input volume (voxels).
      patch_size: side of the cubic patch embedding.
      in_chans: input channels (1 for CT/MR).
      encoder_embed_dim / encoder_depth / encoder_num_heads / mlp_ratio: ViT trunk.
      encoder_global_attn_indexes: blocks that attend over the whole token grid.
      window_size: window side of the other blocks (0 = every block global).
      qkv_bias, use_abs_pos, use_rel_pos: as the original constructor flags.
      encoder_norm_eps: LayerNorm epsilon of the encoder blocks.
      prompt_embed_dim: neck output width = prompt/decoder width.
      mask_in_chans: hidden width of the mask-prompt downscaling.
      num_multimask_outputs, iou_head_depth, iou_head_hidden_dim: decoder heads.
      decoder_depth, decoder_num_heads, decoder_mlp_dim, attention_downsample_rate:
        two-way transformer (hard-coded 2 / 8 / 2048 / 2 in the original).
      dtype: compute dtype of matmuls and convolutions ("float32" or "bfloat16");
        parameters, LayerNorm statistics, softmax and positional encodings stay float32.
      window_attention: "exact" computes windowed blocks over the real tokens plus a
        closed-form term for the zero-padded ones (same result, far fewer FLOPs);
        "padded" runs the original's literal padded windows (reference for tests).
      attention_impl: encoder attention kernel. "einsum": explicit logits and softmax
        (float32 softmax; the reference). "xla" / "cudnn": `jax.nn.dot_product_attention`
        with the relative-position bias, through XLA or cuDNN's fused kernel ("cudnn"
        needs a CUDA GPU and dtype bfloat16 or float16). "auto": "cudnn" where that works
        (bfloat16/float16 on an NVIDIA GPU of compute capability >= 8.0; measured faster,
        BENCHMARKS.md), else "einsum". "pallas": a kernel that forms the relative-position
        bias on chip instead of reading it from memory (`rel_pos_attention`; Triton on a
        GPU, Pallas' slow interpreter elsewhere; for single-device inference: its backward
        pass is a dense reference and it is not partitioned over a mesh; not yet timed).
      remat: rematerialise each encoder block in the backward pass.
      gelu: the encoder MLP's activation. "exact" (erf), as the original; "tanh": its tanh
        approximation, within 5e-4 of it everywhere (a thirtieth of a bfloat16 rounding
        step where they differ most) and a third of its cost on a GPU; "auto" (default):
        "tanh" in bfloat16/float16, where rounding dwarfs the difference, "exact" in float32.
    """

    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    encoder_norm_eps: float = 1e-6
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    dtype: str = "float32"
    window_attention: WindowAttention = "exact"
    attention_impl: AttentionImpl = "auto"
    remat: bool = False
    gelu: GeluForm = "auto"

    def __post_init__(self) -> None:
        wrong = [
            f"{f.name}={getattr(self, f.name)!r} (expected {f.type})"
            for f in dataclasses.fields(self)
            if not _has_type(getattr(self, f.name), f.type)
        ]
        if wrong:  # e.g. a hand-edited config.json: named here, not as a failed comparison
            raise ValueError("invalid Sam3DConfig: " + "; ".join(wrong))
        object.__setattr__(
            self,
            "encoder_global_attn_indexes",
            tuple(int(i) for i in self.encoder_global_attn_indexes),
        )
        positive = (
            "img_size", "patch_size", "in_chans", "encoder_embed_dim", "encoder_depth",
            "encoder_num_heads", "prompt_embed_dim", "mask_in_chans", "iou_head_depth",
            "iou_head_hidden_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_dim",
            "attention_downsample_rate",
        )  # fmt: skip
        bad = [f"{f}={getattr(self, f)} (must be >= 1)" for f in positive if getattr(self, f) < 1]
        if not self.mlp_ratio > 0:
            bad.append(f"mlp_ratio={self.mlp_ratio} (must be > 0)")
        if self.num_multimask_outputs < 0:
            bad.append(f"num_multimask_outputs={self.num_multimask_outputs} (must be >= 0)")
        if bad:  # checked first: the divisibility checks below would divide by them
            raise ValueError("invalid Sam3DConfig: " + "; ".join(bad))
        problems = []
        if self.img_size % self.patch_size:
            problems.append(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append(
                f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"encoder_num_heads {self.encoder_num_heads}"
            )
        if self.prompt_embed_dim % 3:
            problems.append(f"prompt_embed_dim {self.prompt_embed_dim} is not divisible by 3")
        if self.prompt_embed_dim % 8:
            problems.append(f"prompt_embed_dim {self.prompt_embed_dim} is not divisible by 8")
        internal = self.prompt_embed_dim // self.attention_downsample_rate
        if internal % self.decoder_num_heads or self.prompt_embed_dim % self.decoder_num_heads:
            problems.append("decoder_num_heads must divide the decoder attention widths")
        if self.mask_in_chans % 4:
            problems.append(f"mask_in_chans {self.mask_in_chans} is not divisible by 4")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            problems.append(
                f"encoder_global_attn_indexes {bad} outside 0..{self.encoder_depth - 1}"
            )
        if self.window_size < 0:
            problems.append("window_size must be >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype {self.dtype!r} is not one of float32, bfloat16, float16")
        if self.window_attention not in ("exact", "padded"):
            problems.append(
                f"window_attention {self.window_attention!r} is not 'exact' or 'padded'"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(
                f"attention_impl {self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}"
            )
        elif self.attention_impl == "cudnn" and self.dtype == "float32":
            problems.append("attention_impl 'cudnn' needs dtype bfloat16 or float16")
        if self.gelu not in ("auto", "exact", "tanh"):
            problems.append(f"gelu {self.gelu!r} is not one of auto, exact, tanh")
        if problems:
            raise ValueError("invalid Sam3DConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        """Token-grid side (= image-embedding side)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (4x the embedding grid)."""
        return 4 * self.grid_size

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def gelu_form(self) -> str:
        """The encoder GELU actually computed: "exact" or "tanh" ("auto" resolved)."""
        if self.gelu != "auto":
            return self.gelu
        return "exact" if self.dtype == "float32" else "tanh"

    def is_windowed(self, block: int) -> bool:
        return self.window_size > 0 and block not in self.encoder_global_attn_indexes

    def replace(self, **changes: Any) -> Sam3DConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sam3DConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Sam3DConfig fields: {unknown}")
        return cls(**dict(d))

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> Sam3DConfig:
        if name not in VARIANTS:
            raise ValueError(f"unknown model variant {name!r}; known: {sorted(VARIANTS)}")
        return VARIANTS[name].replace(**overrides)


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a config value fits its field's annotation (numbers of numpy types too)."""
    is_bool = isinstance(value, bool | np.bool_)
    if annotation == "bool":
        return is_bool
    if annotation == "int":
        return isinstance(value, numbers.Integral) and not is_bool
    if annotation == "float":
        return isinstance(value, numbers.Real) and not is_bool
    if annotation == "tuple[int, ...]":
        return isinstance(value, tuple | list) and all(_has_type(v, "int") for v in value)
    return isinstance(value, str)  # str and the Literal choices, checked by value below


def matching_variant(cfg: Sam3DConfig) -> str | None:
    """The registry variant with `cfg`'s architecture (numeric fields aside), or None."""
    arch = {k: v for k, v in cfg.to_dict().items() if k not in NUMERIC_FIELDS}
    for name, variant in VARIANTS.items():
        if {k: v for k, v in variant.to_dict().items() if k not in NUMERIC_FIELDS} == arch:
            return name
    return None


VARIANTS: dict[str, Sam3DConfig] = {
    # The released SAM-Med3D / SAM-Med3D-turbo architecture.
    "vit_b_ori": Sam3DConfig(),
    # Registry entries of the original at 256^3 input.
    "vit_b": Sam3DConfig(img_size=256, encoder_embed_dim=384),
    "vit_l": Sam3DConfig(
        img_size=256,
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": Sam3DConfig(
        img_size=256,
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # The configuration of the golden "small" test vectors (64^3 input, 4^3 tokens).
    "small": Sam3DConfig(
        img_size=64,
        encoder_embed_dim=96,
        encoder_depth=3,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1,),
        window_size=6,
        prompt_embed_dim=48,
    ),
    # A fast model for tests and CPU smoke runs: 64^3 input, still windowed with padding.
    "tiny": Sam3DConfig(
        img_size=64,
        encoder_embed_dim=48,
        encoder_depth=2,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(1,),
        window_size=6,
        prompt_embed_dim=48,
        decoder_mlp_dim=96,
        iou_head_hidden_dim=32,
    ),
}
