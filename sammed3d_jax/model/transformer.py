"""Two-way transformer of the mask decoder (`TwoWayTransformer3D`).

Tokens ``(B, T, C)`` (IoU token, mask tokens, sparse prompts) and image tokens ``(B, G, C)``
(the embedding grid flattened row-major over A0, A1, A2) attend to each other. Decoder
LayerNorms use PyTorch's default epsilon 1e-5. An optional token mask (B, T) removes unused
prompt slots from every attention in which tokens act as keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sammed3d_jax.model.common import LayerNorm, MLPBlock, linear
from sammed3d_jax.model.config import Sam3DConfig
from sammed3d_jax.sharding import shard

Array = jax.Array
F32 = jnp.float32
DECODER_LN_EPS = 1e-5


class DownscaleAttention(nnx.Module):
    """Attention with q/k/v projected to `embedding_dim // downsample_rate` channels."""

    def __init__(
        self, dim: int, num_heads: int, downsample_rate: int, *, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        internal = dim // downsample_rate
        self.num_heads = num_heads
        self.dtype = dtype
        axes = ("embed_prompt", "heads_prompt")
        self.q_proj = linear(dim, internal, axes=axes, dtype=dtype, rngs=rngs)
        self.k_proj = linear(dim, internal, axes=axes, dtype=dtype, rngs=rngs)
        self.v_proj = linear(dim, internal, axes=axes, dtype=dtype, rngs=rngs)
        self.out_proj = linear(internal, dim, axes=axes[::-1], dtype=dtype, rngs=rngs)

    def __call__(self, q: Array, k: Array, v: Array, key_mask: Array | None = None) -> Array:
        """q (B, Tq, C), k/v (B, Tk, C), key_mask (B, Tk) bool -> (B, Tq, C)."""
        b, tq, _ = q.shape
        tk = k.shape[1]
        q = self.q_proj(q.astype(self.dtype)).reshape(b, tq, self.num_heads, -1)
        k = self.k_proj(k.astype(self.dtype)).reshape(b, tk, self.num_heads, -1)
        v = self.v_proj(v.astype(self.dtype)).reshape(b, tk, self.num_heads, -1)
        head_dim = q.shape[-1]
        logits = jnp.einsum("bqke,bske->bkqs", q, k, preferred_element_type=F32).astype(F32)
        # The original divides after the product (the encoder scales q before it).
        logits = logits / np.float32(np.sqrt(head_dim))
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkqs,bske->bqke", probs.astype(self.dtype), v)
        return self.out_proj(out.reshape(b, tq, -1)).astype(F32)


class TwoWayAttentionBlock3D(nnx.Module):
    def __init__(self, cfg: Sam3DConfig, skip_first_layer_pe: bool, *, rngs: nnx.Rngs):
        c, heads, rate, dtype = (
            cfg.prompt_embed_dim,
            cfg.decoder_num_heads,
            cfg.attention_downsample_rate,
            cfg.compute_dtype,
        )
        self.self_attn = DownscaleAttention(c, heads, 1, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(c, epsilon=DECODER_LN_EPS, rngs=rngs)
        self.cross_attn_token_to_image = DownscaleAttention(c, heads, rate, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(c, epsilon=DECODER_LN_EPS, rngs=rngs)
        self.mlp = MLPBlock(
            c, cfg.decoder_mlp_dim, act="relu", dtype=dtype, rngs=rngs, axes=("embed_prompt", "mlp")
        )
        self.norm3 = LayerNorm(c, epsilon=DECODER_LN_EPS, rngs=rngs)
        self.norm4 = LayerNorm(c, epsilon=DECODER_LN_EPS, rngs=rngs)
        self.cross_attn_image_to_token = DownscaleAttention(c, heads, rate, dtype=dtype, rngs=rngs)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self, queries: Array, keys: Array, query_pe: Array, key_pe: Array, token_mask: Array | None
    ) -> tuple[Array, Array]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries).astype(F32))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_mask))
        return queries, keys


class TwoWayTransformer3D(nnx.Module):
    def __init__(self, cfg: Sam3DConfig, *, rngs: nnx.Rngs):
        c = cfg.prompt_embed_dim
        self.layers = nnx.List(
            [TwoWayAttentionBlock3D(cfg, i == 0, rngs=rngs) for i in range(cfg.decoder_depth)]
        )
        self.final_attn_token_to_image = DownscaleAttention(
            c,
            cfg.decoder_num_heads,
            cfg.attention_downsample_rate,
            dtype=cfg.compute_dtype,
            rngs=rngs,
        )
        self.norm_final_attn = LayerNorm(c, epsilon=DECODER_LN_EPS, rngs=rngs)

    def __call__(
        self,
        image_embedding: Array,
        image_pe: Array,
        point_embedding: Array,
        token_mask: Array | None = None,
    ) -> tuple[Array, Array]:
        """image_embedding/image_pe (B, g, g, g, C), point_embedding (B, T, C).

        Returns processed tokens (B, T, C) and image tokens (B, g^3, C).
        """
        b, *_, c = image_embedding.shape
        keys = image_embedding.reshape(b, -1, c).astype(F32)
        key_pe = image_pe.reshape(image_pe.shape[0], -1, c).astype(F32)
        queries = point_embedding.astype(F32)
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, token_mask)
            keys = shard(keys, ("batch", None, "act_embed"))
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
