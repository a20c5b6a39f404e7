"""Mask decoder (`MaskDecoder3D`): two-way transformer, upscaling, hypernetworks, IoU head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sammed3d_jax.model.common import MLP, ConvTranspose3dK2, Embedding, LayerNorm, gelu
from sammed3d_jax.model.config import Sam3DConfig
from sammed3d_jax.model.transformer import TwoWayTransformer3D
from sammed3d_jax.sharding import shard

Array = jax.Array
F32 = jnp.float32


def token_multiple() -> int:
    """The decoder's token count is padded to a multiple of this (GPUs: 8, the row multiple
    XLA aligns bfloat16 matrix products to); elsewhere no padding (not measured to help)."""
    return 8 if jax.default_backend() == "gpu" else 1


class MaskDecoder3D(nnx.Module):
    def __init__(self, cfg: Sam3DConfig, *, rngs: nnx.Rngs):
        c, dtype = cfg.prompt_embed_dim, cfg.compute_dtype
        self.transformer = TwoWayTransformer3D(cfg, rngs=rngs)
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.iou_token = Embedding(1, c, rngs=rngs)
        self.mask_tokens = Embedding(self.num_mask_tokens, c, rngs=rngs)
        self.output_upscaling = nnx.Dict(
            {
                "0": ConvTranspose3dK2(c, c // 4, dtype=dtype, rngs=rngs),
                "1": LayerNorm(c // 4, epsilon=1e-6, rngs=rngs),
                "3": ConvTranspose3dK2(c // 4, c // 8, dtype=dtype, rngs=rngs),
            }
        )
        self.output_hypernetworks_mlps = nnx.List(
            [MLP(c, c, c // 8, 3, dtype=dtype, rngs=rngs) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(
            c,
            cfg.iou_head_hidden_dim,
            self.num_mask_tokens,
            cfg.iou_head_depth,
            dtype=dtype,
            rngs=rngs,
        )
        self.dtype = dtype

    def predict_masks(
        self,
        image_embeddings: Array,
        image_pe: Array,
        sparse: Array,
        dense: Array,
        sparse_mask: Array | None = None,
        return_intermediates: bool = False,
        mask_slice: slice = slice(None),
        remat_upscaling: bool = True,
    ):
        """Mask-token outputs: masks (B, M', 4g, 4g, 4g) float32 and IoU (B, M').

        `mask_slice` picks the M' of the M mask tokens whose masks are computed (all by
        default): only their hypernetworks run, so the training step's single-mask passes do
        not run (and differentiate) the other three. With `return_intermediates`, also a dict
        with the transformer outputs (`transformer_queries` (B, T, C), `transformer_keys`
        (B, g^3, C)) and the `upscaled_embedding` (B, 4g, 4g, 4g, C/8). `remat_upscaling`:
        recompute the upscaling in the backward pass (see below).
        """
        b = sparse.shape[0]
        output_tokens = jnp.concatenate(
            [self.iou_token.embedding[...], self.mask_tokens.embedding[...]], axis=0
        )
        n_out = output_tokens.shape[0]
        tokens = jnp.concatenate(
            [
                jnp.broadcast_to(output_tokens[None], (b, n_out, output_tokens.shape[1])),
                sparse.astype(F32),
            ],
            axis=1,
        )
        token_mask = None
        if sparse_mask is not None:
            token_mask = jnp.concatenate(
                [jnp.ones((b, n_out), bool), sparse_mask.astype(bool)], axis=1
            )
        n_tokens = tokens.shape[1]
        extra = -n_tokens % token_multiple()
        if extra:
            # Masked filler tokens: no token attends to them, so the real tokens' values are
            # unchanged, and every token product has aligned shapes (XLA pads each one for
            # the GPU's matrix units otherwise: ~650 pad kernels in a training step).
            tokens = jnp.concatenate([tokens, jnp.zeros((b, extra, tokens.shape[2]), F32)], 1)
            if token_mask is None:
                token_mask = jnp.ones((b, n_tokens), bool)
            token_mask = jnp.concatenate([token_mask, jnp.zeros((b, extra), bool)], axis=1)
        bi = image_embeddings.shape[0]
        if bi != b:
            if bi != 1:
                raise ValueError(
                    f"image embeddings have batch {bi} but prompts have batch {b}; "
                    "the batches must match or the image batch must be 1"
                )
            image_embeddings = jnp.broadcast_to(image_embeddings, (b, *image_embeddings.shape[1:]))
        src = image_embeddings.astype(F32) + dense.astype(F32)
        pos = jnp.broadcast_to(image_pe, (b, *image_pe.shape[1:])).astype(F32)
        g = src.shape[1:4]
        hs, src = self.transformer(src, pos, tokens, token_mask)
        hs = hs[:, :n_tokens]
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]

        chosen = range(self.num_mask_tokens)[mask_slice]
        hyper = jnp.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i]) for i in chosen], axis=1
        )  # (B, M', C/8)
        grid = src.reshape(b, *g, -1)
        if return_intermediates or not remat_upscaling:
            x = self._upscale(grid)
            masks = self._mask_product(x, hyper)
        else:
            # Recomputed in the backward pass from the (B, g³, C) grid: the upscaled
            # activations are 8x and 64x the grid's voxels, and the training step's click
            # loop (as a device loop) would otherwise keep them stacked for every pass.
            masks = jax.checkpoint(lambda s, h: self._mask_product(self._upscale(s), h))(
                grid, hyper
            )
        iou_pred = self.iou_prediction_head(iou_token_out).astype(F32)[:, mask_slice]
        if return_intermediates:
            inter = {"transformer_queries": hs, "transformer_keys": src, "upscaled_embedding": x}
            return masks, iou_pred, inter
        return masks, iou_pred

    def _upscale(self, grid: Array) -> Array:
        """(B, g, g, g, C) -> (B, 4g, 4g, 4g, C/8) float32."""
        up = self.output_upscaling
        x = gelu(up["1"](up["0"](grid)))
        x = gelu(up["3"](x.astype(self.dtype)).astype(F32))
        return shard(x, ("batch", None, None, None, "act_embed"))

    def _mask_product(self, x: Array, hyper: Array) -> Array:
        """Masks (B, M, 4g, 4g, 4g) = upscaled embedding · hypernetwork outputs (B, M, C/8)."""
        # Channels-last product, then the (small) mask axis moved to the front: contracting
        # the embedding in its own layout avoids a transposed copy of it.
        masks = jnp.einsum(
            "bdhwc,bmc->bdhwm",
            x.astype(self.dtype),
            hyper.astype(self.dtype),
            preferred_element_type=F32,
        )
        return jnp.moveaxis(masks, -1, 1).astype(F32)

    def __call__(
        self,
        image_embeddings: Array,
        image_pe: Array,
        sparse: Array,
        dense: Array,
        multimask_output: bool = False,
        sparse_mask: Array | None = None,
        remat_upscaling: bool = True,
    ) -> tuple[Array, Array]:
        """Decode masks.

        Args:
          image_embeddings: (B or 1, g, g, g, C) from the image encoder.
          image_pe: (1, g, g, g, C) dense positional encoding.
          sparse: (B, T, C) point embeddings; dense: (B, g, g, g, C) mask embeddings.
          multimask_output: False -> mask token 0 only; True -> tokens 1..M-1.
          sparse_mask: optional (B, T) validity of the sparse tokens.
          remat_upscaling: recompute the upscaled activations in the backward pass (less
            memory in a device loop over clicks; more kernels).

        Returns:
          low-res mask logits (B, 1 or M-1, 4g, 4g, 4g) and IoU predictions (B, 1 or M-1).
        """
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return self.predict_masks(
            image_embeddings,
            image_pe,
            sparse,
            dense,
            sparse_mask,
            mask_slice=sl,
            remat_upscaling=remat_upscaling,
        )
