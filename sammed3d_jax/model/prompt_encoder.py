"""Prompt encoder (`PromptEncoder3D`): point prompts, mask prompts, dense positional encoding.

Conventions reproduced from the original on purpose (the released weights were trained with
them):
- The random Fourier encoding outputs ``[sin, cos, sin]`` (the last third repeats the first).
- The dense grid encoding swaps the first two axes: cell (a0, a1, a2) is encoded at
  ``((a1+.5)/s0, (a0+.5)/s1, (a2+.5)/s2)``, while a point (p0, p1, p2) in voxels of the input is
  encoded at ``((p0+.5)/S0, (p1+.5)/S1, (p2+.5)/S2)``.
- A padding point (label -1, coordinates 0) is appended after the user's points; label -1
  rows get only `not_a_point_embed`.

Point prompts can carry a validity mask so that a fixed number of point slots serves any
number of clicks: invalid slots are masked out of every attention in the decoder and leave
the outputs exactly as if they were absent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sammed3d_jax.model.common import Buffer, Embedding, LayerNorm, conv3d, gelu
from sammed3d_jax.model.config import Sam3DConfig

Array = jax.Array
F32 = jnp.float32


class PositionEmbeddingRandom3D(nnx.Module):
    """Random Fourier features; the Gaussian matrix is a persistent buffer."""

    def __init__(self, num_pos_feats: int, *, rngs: nnx.Rngs):
        self.positional_encoding_gaussian_matrix = Buffer(
            jax.random.normal(rngs.params(), (3, num_pos_feats), F32)
        )

    def encode(self, coords: Array) -> Array:
        """coords (..., 3) in [0, 1] -> (..., 3 * num_pos_feats) float32."""
        g = self.positional_encoding_gaussian_matrix[...].astype(F32)
        u = 2.0 * coords.astype(F32) - 1.0
        # A K=3 contraction written out, so no matmul precision setting can change it.
        z = u[..., 0:1] * g[0] + u[..., 1:2] * g[1] + u[..., 2:3] * g[2]
        z = (2.0 * np.pi) * z
        s = jnp.sin(z)
        return jnp.concatenate([s, jnp.cos(z), s], axis=-1)

    def dense(self, size: tuple[int, int, int]) -> Array:
        """Encoding of every cell of a (s0, s1, s2) grid -> (s0, s1, s2, C)."""
        s0, s1, s2 = size
        a0 = (np.arange(s0, dtype=np.float32) + 0.5)[:, None, None]
        a1 = (np.arange(s1, dtype=np.float32) + 0.5)[None, :, None]
        a2 = (np.arange(s2, dtype=np.float32) + 0.5)[None, None, :]
        c0 = np.broadcast_to(a1 / np.float32(s0), size)
        c1 = np.broadcast_to(a0 / np.float32(s1), size)
        c2 = np.broadcast_to(a2 / np.float32(s2), size)
        return self.encode(jnp.asarray(np.stack([c0, c1, c2], axis=-1)))


class PromptEncoder3D(nnx.Module):
    def __init__(self, cfg: Sam3DConfig, *, rngs: nnx.Rngs):
        c = cfg.prompt_embed_dim
        g = cfg.grid_size
        self.embed_dim = c
        self.image_embedding_size = (g, g, g)
        self.input_image_size = (cfg.img_size,) * 3
        self.pe_layer = PositionEmbeddingRandom3D(c // 3, rngs=rngs)
        self.point_embeddings = nnx.List([Embedding(1, c, rngs=rngs) for _ in range(2)])
        self.not_a_point_embed = Embedding(1, c, rngs=rngs)
        m, dtype = cfg.mask_in_chans, cfg.compute_dtype
        self.mask_downscaling = nnx.Dict(
            {
                "0": conv3d(1, m // 4, 2, stride=2, dtype=dtype, rngs=rngs),
                "1": LayerNorm(m // 4, epsilon=1e-6, rngs=rngs),
                "3": conv3d(m // 4, m, 2, stride=2, dtype=dtype, rngs=rngs),
                "4": LayerNorm(m, epsilon=1e-6, rngs=rngs),
                "6": conv3d(m, c, 1, dtype=dtype, rngs=rngs),
            }
        )
        self.no_mask_embed = Embedding(1, c, rngs=rngs)
        self.dtype = dtype

    def get_dense_pe(self) -> Array:
        """Dense positional encoding (1, g, g, g, C) of the image-embedding grid."""
        return self.pe_layer.dense(self.image_embedding_size)[None]

    def embed_points(self, points: Array, labels: Array, pad: bool = True) -> Array:
        """points (B, N, 3) voxel coords in input axis order; labels (B, N) -> (B, N+pad, C)."""
        points = points.astype(F32) + 0.5
        labels = labels.astype(jnp.int32)
        if pad:
            b = points.shape[0]
            points = jnp.concatenate([points, jnp.zeros((b, 1, 3), F32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), jnp.int32)], axis=1)
        sizes = jnp.asarray(self.input_image_size, F32)
        pe = self.pe_layer.encode(points / sizes)
        lab = labels[..., None]
        pe = jnp.where(lab == -1, 0.0, pe)
        pe = pe + jnp.where(lab == -1, self.not_a_point_embed.embedding[...], 0.0)
        pe = pe + jnp.where(lab == 0, self.point_embeddings[0].embedding[...], 0.0)
        pe = pe + jnp.where(lab == 1, self.point_embeddings[1].embedding[...], 0.0)
        return pe

    def embed_masks(self, masks: Array) -> Array:
        """masks (B, 4g, 4g, 4g) low-res logits -> dense embeddings (B, g, g, g, C)."""
        x = masks.astype(F32)[..., None]
        ds = self.mask_downscaling
        x = gelu(ds["1"](ds["0"](x.astype(self.dtype))))
        x = gelu(ds["4"](ds["3"](x.astype(self.dtype))))
        return ds["6"](x.astype(self.dtype)).astype(F32)

    def __call__(
        self,
        points: tuple[Array, Array] | None = None,
        masks: Array | None = None,
        batch_size: int | None = None,
        point_mask: Array | None = None,
    ) -> tuple[Array, Array, Array]:
        """Embed prompts.

        Args:
          points: optional (coords (B, N, 3), labels (B, N)); a padding point is appended.
          masks: optional low-res mask logits (B, 4g, 4g, 4g); None uses `no_mask_embed`.
          batch_size: B when neither points nor masks are given (default 1).
          point_mask: optional (B, N) bool; False marks an unused point slot.

        Returns:
          sparse (B, N+1, C) (or (B, 0, C) without points), dense (B, g, g, g, C) and the
          sparse-token validity mask (B, N+1) (or (B, 0)).
        """
        if points is not None:
            b = points[0].shape[0]
        elif masks is not None:
            b = masks.shape[0]
        else:
            b = 1 if batch_size is None else batch_size
        c = self.embed_dim
        if points is not None:
            sparse = self.embed_points(points[0], points[1], pad=True)
            n = points[0].shape[1]
            valid = jnp.ones((b, n), bool) if point_mask is None else point_mask.astype(bool)
            valid = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)
        else:
            sparse = jnp.zeros((b, 0, c), F32)
            valid = jnp.zeros((b, 0), bool)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            g = self.image_embedding_size
            dense = jnp.broadcast_to(
                self.no_mask_embed.embedding[...].reshape(1, 1, 1, 1, c), (b, *g, c)
            )
        return sparse, dense, valid
