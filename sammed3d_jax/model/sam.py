"""`Sam3D`: the three parts wired together, with the image embedding reusable across clicks.

Shapes (S = img_size, g = S / patch, L = 4g the low-res mask side):
  volumes             (B, S, S, S) or (B, S, S, S, C_in), z-normalised, axes A0, A1, A2
  image embeddings    (B, g, g, g, C)
  points / labels     (B, N, 3) voxel coordinates in A0, A1, A2 order / (B, N) in {1, 0, -1}
  low-res logits      (B, M, L, L, L)
  full-res logits     (B, M, S, S, S)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sammed3d_jax.model.common import upsample_logits
from sammed3d_jax.model.config import Sam3DConfig
from sammed3d_jax.model.image_encoder import ImageEncoderViT3D
from sammed3d_jax.model.mask_decoder import MaskDecoder3D
from sammed3d_jax.model.prompt_encoder import PromptEncoder3D

Array = jax.Array


@struct.dataclass
class Sam3DOutput:
    """Decoder output for one prompt batch.

    low_res_logits: (B, M, L, L, L) raw logits; feed back as `mask_input` on the next click.
    iou_predictions: (B, M) (never trained in the released weights; see README).
    """

    low_res_logits: Array
    iou_predictions: Array

    def full_res_logits(self, size: int) -> Array:
        """(B, M, size, size, size) trilinear upsampling, PyTorch `align_corners=False`."""
        return upsample_logits(self.low_res_logits, size)

    def masks(self, size: int) -> Array:
        """Binary masks at full resolution: sigmoid(logits) > 0.5, i.e. logits > 0."""
        return self.full_res_logits(size) > 0


class Sam3D(nnx.Module):
    """SAM-Med3D model: `image_encoder`, `prompt_encoder`, `mask_decoder`."""

    def __init__(self, cfg: Sam3DConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.image_encoder = ImageEncoderViT3D(cfg, rngs=rngs)
        self.prompt_encoder = PromptEncoder3D(cfg, rngs=rngs)
        self.mask_decoder = MaskDecoder3D(cfg, rngs=rngs)

    def encode(self, volumes: Array) -> Array:
        """Image embeddings (B, g, g, g, C) of volumes (B, S, S, S[, C_in])."""
        if volumes.ndim == 4:
            volumes = volumes[..., None]
        cfg = self.config
        expected = (cfg.img_size,) * 3 + (cfg.in_chans,)
        if tuple(volumes.shape[1:]) != expected:
            raise ValueError(
                f"volumes must have shape (B, {', '.join(map(str, expected))}), got {volumes.shape}"
            )
        return self.image_encoder(volumes)

    def decode(
        self,
        image_embeddings: Array,
        points: Array | None = None,
        labels: Array | None = None,
        mask_input: Array | None = None,
        *,
        point_mask: Array | None = None,
        multimask_output: bool = False,
        batch_size: int | None = None,
    ) -> Sam3DOutput:
        """Prompt encoder + mask decoder for one interaction.

        Args:
          image_embeddings: (B or 1, g, g, g, C) from `encode`.
          points: optional (B, N, 3) float voxel coordinates of the S^3 input (A0, A1, A2).
          labels: (B, N) int: 1 foreground, 0 background, -1 ignored.
          mask_input: optional previous low-res logits (B, L, L, L) or (B, 1, L, L, L); None
            uses the (untrained in the released weights) `no_mask_embed`. The original's
            interactive loops pass zeros on the first click.
          point_mask: optional (B, N) bool; False slots are ignored exactly.
          multimask_output: False -> one mask; True -> the 3 multimask outputs.
          batch_size: prompt batch when neither points nor masks are given.
        """
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if mask_input is not None and mask_input.ndim == 5:
            if mask_input.shape[1] != 1:
                raise ValueError(f"mask_input must have one channel, got shape {mask_input.shape}")
            mask_input = mask_input[:, 0]
        self._check_prompts(image_embeddings, points, labels, mask_input, point_mask)
        if batch_size is None and points is None and mask_input is None:
            batch_size = image_embeddings.shape[0]
        sparse, dense, valid = self.prompt_encoder(
            (points, labels) if points is not None else None,
            mask_input,
            batch_size=batch_size,
            point_mask=point_mask,
        )
        low, iou = self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output=multimask_output,
            sparse_mask=valid if point_mask is not None else None,
        )
        return Sam3DOutput(low_res_logits=low, iou_predictions=iou)

    def _check_prompts(self, emb, points, labels, mask_input, point_mask) -> None:
        """Shape errors as one ValueError naming the argument (not deep inside jax)."""
        cfg = self.config
        g, low = cfg.grid_size, cfg.low_res_size
        want = (g, g, g, cfg.prompt_embed_dim)
        if emb.ndim != 5 or tuple(emb.shape[1:]) != want:
            raise ValueError(f"image_embeddings must have shape (B, {want}), got {emb.shape}")
        batches = {}
        if points is not None:
            if points.ndim != 3 or points.shape[-1] != 3:
                raise ValueError(f"points must have shape (B, N, 3), got {points.shape}")
            if tuple(labels.shape) != tuple(points.shape[:2]):
                raise ValueError(f"labels must have shape {points.shape[:2]}, got {labels.shape}")
            batches["points"] = points.shape[0]
        if point_mask is not None:
            if points is None or tuple(point_mask.shape) != tuple(points.shape[:2]):
                expected = "points" if points is None else points.shape[:2]
                raise ValueError(f"point_mask must have shape {expected}, got {point_mask.shape}")
        if mask_input is not None:
            if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (low,) * 3:
                raise ValueError(
                    f"mask_input must have shape (B, {low}, {low}, {low}), got {mask_input.shape}"
                )
            batches["mask_input"] = mask_input.shape[0]
        if len(set(batches.values())) > 1:
            raise ValueError(f"prompt batch sizes differ: {batches}")
        b = next(iter(batches.values()), emb.shape[0])
        if emb.shape[0] not in (1, b):
            raise ValueError(
                f"image_embeddings batch {emb.shape[0]} is neither 1 nor the prompts' batch {b}"
            )

    def __call__(
        self,
        volumes: Array,
        points: Array | None = None,
        labels: Array | None = None,
        mask_input: Array | None = None,
        multimask_output: bool = False,
    ) -> Sam3DOutput:
        """Encode and decode in one call (one prompt set per volume)."""
        emb = self.encode(volumes)
        return self.decode(emb, points, labels, mask_input, multimask_output=multimask_output)


def build_sam3d(cfg: Sam3DConfig | str = "vit_b_ori", seed: int = 0) -> Sam3D:
    """A randomly initialised model (PyTorch's default initialisation scheme)."""
    if isinstance(cfg, str):
        cfg = Sam3DConfig.from_variant(cfg)
    model = abstract_sam3d(cfg)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, host_init(nnx.to_pure_dict(state), seed))
    nnx.update(model, state)
    return model


def host_init(abstract: dict, seed: int = 0) -> dict:
    """PyTorch-default initial values for an abstract parameter tree, drawn with numpy.

    Same scheme as the module constructors (U(+-1/sqrt(fan_in)) for weights and biases, with
    PyTorch's fan-in of a transposed convolution taken from its output channels; LayerNorm
    ones/zeros; N(0, 1) embeddings and Fourier matrix; zero position tables), but generated on
    the host in milliseconds instead of compiling hundreds of random-number kernels.
    """
    rng = np.random.default_rng(seed)
    leaves = {
        tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
    }

    def fan_in(kernel_path: tuple) -> int:
        shape = leaves[kernel_path].shape
        if "output_upscaling" in kernel_path:
            return int(np.prod(shape[:-2])) * shape[-1]
        return int(np.prod(shape[:-1]))

    out = {}
    for path, leaf in leaves.items():
        name, parent = path[-1], path[:-1]
        shape = leaf.shape
        if name == "kernel":
            bound = 1.0 / np.sqrt(fan_in(path))
            value = rng.uniform(-bound, bound, shape)
        elif name == "bias" and (*parent, "kernel") in leaves:
            bound = 1.0 / np.sqrt(fan_in((*parent, "kernel")))
            value = rng.uniform(-bound, bound, shape)
        elif name == "scale":
            value = np.ones(shape)
        elif name in ("embedding", "positional_encoding_gaussian_matrix"):
            value = rng.standard_normal(shape)
        else:  # LayerNorm biases, pos_embed, rel_pos tables
            value = np.zeros(shape)
        out[path] = jnp.asarray(value.astype(np.float32))
    nested: dict = {}
    for path, value in out.items():
        node = nested
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return nested


def abstract_sam3d(cfg: Sam3DConfig | str = "vit_b_ori") -> Sam3D:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes at zero memory."""
    if isinstance(cfg, str):
        cfg = Sam3DConfig.from_variant(cfg)
    return nnx.eval_shape(lambda: Sam3D(cfg, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (buffers such as the Fourier matrix excluded)."""
    state = nnx.state(model, nnx.Param)
    return int(sum(x.size for x in jax.tree_util.tree_leaves(state)))


# Leaves that feed a matmul or a convolution as they are, and the biases of those layers
# (added in the library call's epilogue on a GPU): they keep buffers of their own, since
# cut out of a packed buffer each would need a copy first.
OWN_BUFFER_NAMES = frozenset({"kernel", "positional_encoding_gaussian_matrix"})


@dataclasses.dataclass(frozen=True)
class PackedGroup:
    """Leaves of one dtype stored end to end in one 1-D buffer: (leaf index, offset, shape)
    for each."""

    dtype: str
    members: tuple[tuple[int, int, tuple[int, ...]], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class FlatDef:
    """The static half of `split_flat`, hashable so a jitted function takes it as static.

    jit hashes its static arguments on every call, and hashing an `nnx.GraphDef` walks the
    whole module graph (~1.5 ms for `vit_b_ori`): the hash is computed once here, and
    `split_flat` returns one shared instance per architecture, so a cache lookup is an
    identity check.

    ``own`` lists the state leaves passed as buffers of their own, in the order of the flat
    list; ``packed`` the groups that follow them, one buffer each.
    """

    graphdef: Any
    treedef: Any
    own: tuple[int, ...]
    packed: tuple[PackedGroup, ...]
    _hash: int = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        h = hash((self.graphdef, self.treedef, self.own, self.packed))
        object.__setattr__(self, "_hash", h)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, FlatDef) or self._hash != other._hash:
            return False
        return (self.graphdef, self.treedef, self.own, self.packed) == (
            other.graphdef,
            other.treedef,
            other.own,
            other.packed,
        )

    @property
    def num_leaves(self) -> int:
        return self.treedef.num_leaves


_FLATDEFS: dict[FlatDef, FlatDef] = {}


def _own_buffers(paths: list[tuple]) -> list[bool]:
    """For each state leaf: whether it keeps a buffer of its own (see OWN_BUFFER_NAMES;
    also a ``bias`` beside a ``kernel``)."""
    names = [tuple(str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey)) for p in paths]
    with_kernel = {n[:-1] for n in names if n and n[-1] == "kernel"}
    return [
        bool(n) and (n[-1] in OWN_BUFFER_NAMES or (n[-1] == "bias" and n[:-1] in with_kernel))
        for n in names
    ]


def split_flat(module: nnx.Module, pack: bool = True) -> tuple[FlatDef, list[Array]]:
    """`nnx.split` with the state as a plain list of arrays.

    A jitted call flattens its arguments on every call; an `nnx.State` does that in Python
    (~0.2 ms for `vit_b_ori`'s 189 arrays), a list in C++ (~0.04 ms). Per-call paths
    (inference, benchmarks) pass the list and rebuild the module inside the trace with
    `merge_flat`.

    With ``pack``, the leaves that are not weights or biases of a matmul or convolution
    (norm scales and biases, relative-position tables, embeddings: 89 of the 189 arrays of
    the `vit_b_ori` encoder) travel as one 1-D buffer per dtype, cut apart inside the trace
    (the slices fuse into their elementwise consumers). Every array argument costs host
    time in each call: on an H200 a `vit_b_ori` encode spent 1.3 ms launching with 324
    arrays, 0.6 ms more than with the weights compiled into the program. Packing copies
    the leaves once, so it is for weights used many times (inference), not for a training
    state.
    """
    graphdef, state = nnx.split(module)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = [leaf for _, leaf in with_paths]
    own, groups = list(range(len(leaves))), {}
    if pack:
        own = []
        keep = _own_buffers([path for path, _ in with_paths])
        for i, leaf in enumerate(leaves):
            if keep[i] or not hasattr(leaf, "dtype"):
                own.append(i)
            else:
                groups.setdefault(jnp.dtype(leaf.dtype).name, []).append(i)
    packed = []
    for dtype, members in groups.items():
        offset, spec = 0, []
        for i in members:
            shape = tuple(int(n) for n in leaves[i].shape)
            spec.append((i, offset, shape))
            offset += int(np.prod(shape, dtype=np.int64))
        packed.append(PackedGroup(dtype, tuple(spec)))
    flatdef = FlatDef(graphdef, treedef, tuple(own), tuple(packed))
    flat = [leaves[i] for i in own]
    flat += [jnp.concatenate([jnp.ravel(leaves[i]) for i, _, _ in g.members]) for g in packed]
    return _FLATDEFS.setdefault(flatdef, flatdef), flat


def merge_flat(flatdef: FlatDef, leaves: list[Array]) -> Any:
    """Inverse of `split_flat`."""
    if len(leaves) != len(flatdef.own) + len(flatdef.packed):
        raise ValueError(
            f"expected {len(flatdef.own) + len(flatdef.packed)} arrays for this FlatDef, "
            f"got {len(leaves)}"
        )
    state_leaves: list[Any] = [None] * flatdef.num_leaves
    for j, i in enumerate(flatdef.own):
        state_leaves[i] = leaves[j]
    for group, buf in zip(flatdef.packed, leaves[len(flatdef.own) :], strict=True):
        for i, offset, shape in group.members:
            size = int(np.prod(shape, dtype=np.int64))
            state_leaves[i] = jax.lax.slice(buf, (offset,), (offset + size,)).reshape(shape)
    state = jax.tree_util.tree_unflatten(flatdef.treedef, state_leaves)
    return nnx.merge(flatdef.graphdef, state)


_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def compute_dtype_weights(module: nnx.Module) -> nnx.Module:
    """A copy of ``module`` whose linear and convolution weights are stored in the dtype
    every call casts them to (bfloat16 or float16 models); a float32 model as it is.

    For inference: each call of a half-precision model otherwise casts every kernel and
    bias again, one kernel per weight on a GPU (124 of the 390 kernels of the ``vit_b_ori``
    encoder at batch 1), though the cast values never change. The results are bitwise
    the same. Not for training, where the optimizer updates float32 weights.
    """
    from sammed3d_jax.model.common import ConvTranspose3dK2

    layers = (nnx.Linear, nnx.Conv, ConvTranspose3dK2)
    if not any(
        isinstance(m, layers) and jnp.dtype(m.dtype) in _HALF for _, m in nnx.iter_modules(module)
    ):
        return module
    out = nnx.clone(module)
    for _, m in nnx.iter_modules(out):
        if isinstance(m, layers) and jnp.dtype(m.dtype) in _HALF:
            for name in ("kernel", "bias"):
                var = getattr(m, name, None)
                if isinstance(var, nnx.Variable):
                    var.set_value(var.get_value().astype(m.dtype))
    return out
