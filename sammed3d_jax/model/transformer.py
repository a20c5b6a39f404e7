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


def heads_as_blocks() -> bool:
    """Whether the few-token cross-attention maps heads through block-diagonal matrices
    (`DownscaleAttention._blocks`): on GPUs that drops the transposed copies around every
    per-head product (training step: ~280 kernels fewer, counted for an H200); XLA:CPU
    builds the block matrices slowly (one click +2 ms), so it keeps per-head products."""
    return jax.default_backend() == "gpu"


class DownscaleAttention(nnx.Module):
    """Attention with q/k/v projected to `embedding_dim // downsample_rate` channels.

    Cross-attention between a few prompt tokens and the many image tokens does not project
    the image side: the few tokens' per-head query (or key and value) vectors are mapped
    back through the projection weights into the C input channels instead, which needs
    ``H * T_few * C`` multiply-adds per image token rather than two ``C * (C / rate)``
    projections (fewer when ``H * T_few < C / rate``). Same arithmetic, regrouped:

        few queries: q_h . (x W_k,h + b_k,h) = (q_h W_k,h^T) . x + const  (cancels in softmax)
                     P_h (x W_v,h + b_v,h)   = (P_h x) W_v,h + b_v,h       (rows of P sum to 1)
        few keys:    (x W_q,h + b_q,h) . k_h = x . (W_q,h k_h^T) + b_q,h . k_h
                     [P_h v_h]_h W_o + b_o   = sum_h P_h (v_h W_o,h) + b_o
    """

    def __init__(
        self, dim: int, num_heads: int, downsample_rate: int, *, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        internal = dim // downsample_rate
        self.num_heads = num_heads
        self.internal = internal
        self.dtype = dtype
        axes = ("embed_prompt", "heads_prompt")
        self.q_proj = linear(dim, internal, axes=axes, dtype=dtype, rngs=rngs)
        self.k_proj = linear(dim, internal, axes=axes, dtype=dtype, rngs=rngs)
        self.v_proj = linear(dim, internal, axes=axes, dtype=dtype, rngs=rngs)
        self.out_proj = linear(internal, dim, axes=axes[::-1], dtype=dtype, rngs=rngs)

    def __call__(self, q: Array, k: Array, v: Array, key_mask: Array | None = None) -> Array:
        """q (B, Tq, C), k/v (B, Tk, C), key_mask (B, Tk) bool -> (B, Tq, C)."""
        tq, tk = q.shape[1], k.shape[1]
        blocks = heads_as_blocks()
        if tk > tq and self.num_heads * tq < self.internal:
            return (self._few_queries_blocks if blocks else self._few_queries)(q, k, v, key_mask)
        if tq > tk and self.num_heads * tk < self.internal:
            return (self._few_keys_blocks if blocks else self._few_keys)(q, k, v, key_mask)
        return self._projected(q, k, v, key_mask)

    def _projected(self, q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
        """The original's arithmetic: project q, k and v, attend, project the output."""
        b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
        q = self.q_proj(q.astype(self.dtype)).reshape(b, tq, self.num_heads, -1)
        k = self.k_proj(k.astype(self.dtype)).reshape(b, tk, self.num_heads, -1)
        v = self.v_proj(v.astype(self.dtype)).reshape(b, tk, self.num_heads, -1)
        logits = jnp.einsum("bqke,bske->bkqs", q, k, preferred_element_type=F32).astype(F32)
        # The original divides after the product (the encoder scales q before it).
        probs = self._softmax(logits / self._sqrt_head_dim(), key_mask)
        out = jnp.einsum("bkqs,bske->bqke", probs.astype(self.dtype), v)
        return self.out_proj(out.reshape(b, tq, -1)).astype(F32)

    def _sqrt_head_dim(self) -> np.float32:
        return np.float32(np.sqrt(self.internal // self.num_heads))

    def _heads(self, w: nnx.Param) -> Array:
        """An input projection's kernel (C, I) as (C, H, E), in the compute dtype."""
        return w[...].reshape(w.shape[0], self.num_heads, -1).astype(self.dtype)

    def _blocks(self, heads: Array) -> Array:
        """Per-head blocks (H, R, S) as one block-diagonal (H*R, H*S) matrix.

        Products with it keep the few tokens' operands in their (tokens, heads * width)
        layout, where per-head products (the heads as a batch axis) need transposed copies
        of them around each product; the zero blocks cost FLOPs on the few tokens' side only.
        """
        h, r, c = heads.shape
        eye = jnp.eye(h, dtype=self.dtype)
        return jnp.einsum("hrc,hg->hrgc", heads.astype(self.dtype), eye).reshape(h * r, h * c)

    @staticmethod
    def _softmax(logits: Array, key_mask: Array | None) -> Array:
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1)

    def _few_queries(self, q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
        b, tq, _ = q.shape
        dt = self.dtype
        qh = self.q_proj(q.astype(dt)).reshape(b, tq, self.num_heads, -1)
        q_in = jnp.einsum("bqhe,che->bhqc", qh, self._heads(self.k_proj.kernel))
        q_in = (q_in / self._sqrt_head_dim()).astype(dt)
        logits = jnp.einsum("bhqc,bsc->bhqs", q_in, k.astype(dt), preferred_element_type=F32)
        probs = self._softmax(logits.astype(F32), key_mask)
        pv = jnp.einsum("bhqs,bsc->bhqc", probs.astype(dt), v.astype(dt))
        out = jnp.einsum("bhqc,che->bqhe", pv, self._heads(self.v_proj.kernel))
        out = out + self.v_proj.bias[...].reshape(self.num_heads, -1).astype(dt)
        return self.out_proj(out.reshape(b, tq, -1)).astype(F32)

    def _few_keys(self, q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
        b, tk, _ = k.shape
        dt = self.dtype
        kh = self.k_proj(k.astype(dt)).reshape(b, tk, self.num_heads, -1)
        vh = self.v_proj(v.astype(dt)).reshape(b, tk, self.num_heads, -1)
        k_in = jnp.einsum("bshe,che->bhcs", kh, self._heads(self.q_proj.kernel))
        k_in = (k_in / self._sqrt_head_dim()).astype(dt)
        b_q = self.q_proj.bias[...].reshape(self.num_heads, -1).astype(dt)
        shift = jnp.einsum("he,bshe->bhs", b_q, kh, preferred_element_type=F32)
        logits = jnp.einsum("bqc,bhcs->bhqs", q.astype(dt), k_in, preferred_element_type=F32)
        logits = logits.astype(F32) + (shift / self._sqrt_head_dim())[:, :, None, :]
        probs = self._softmax(logits, key_mask)
        w_o = self.out_proj.kernel[...]
        w_o = w_o.reshape(self.num_heads, -1, w_o.shape[-1]).astype(dt)  # (H, E, C)
        v_out = jnp.einsum("bshe,hec->bhsc", vh, w_o)
        out = jnp.einsum("bhqs,bhsc->bqc", probs.astype(dt), v_out)
        return (out + self.out_proj.bias[...].astype(dt)).astype(F32)

    def _few_queries_blocks(self, q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
        """`_few_queries` with rows (query, head) and block-diagonal head maps."""
        b, tq, _ = q.shape
        c = k.shape[2]
        dt = self.dtype
        qh = self.q_proj(q.astype(dt))  # (B, Tq, H*E)
        w_k = self._heads(self.k_proj.kernel)  # (C, H, E)
        # Each head's query mapped back into the C input channels.
        q_in = (qh @ self._blocks(w_k.transpose(1, 2, 0))).reshape(b, -1, c)
        q_in = (q_in / self._sqrt_head_dim()).astype(dt)
        logits = jnp.einsum("bxc,bsc->bxs", q_in, k.astype(dt), preferred_element_type=F32)
        logits = logits.astype(F32)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        pv = jnp.einsum("bxs,bsc->bxc", probs.astype(dt), v.astype(dt)).reshape(b, tq, -1)
        w_v = self._heads(self.v_proj.kernel).transpose(1, 0, 2)  # (H, C, E)
        out = pv @ self._blocks(w_v) + self.v_proj.bias[...].astype(dt)
        return self.out_proj(out).astype(F32)

    def _few_keys_blocks(self, q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
        """`_few_keys` with columns (key, head) and block-diagonal head maps."""
        b, tk, _ = k.shape
        c = q.shape[2]
        h = self.num_heads
        dt = self.dtype
        kh = self.k_proj(k.astype(dt))  # (B, Tk, H*E)
        vh = self.v_proj(v.astype(dt))
        # Each head's key mapped into the C input channels, and its value through its slice
        # of the output projection.
        w_q = self._heads(self.q_proj.kernel)  # (C, H, E)
        k_in = (kh @ self._blocks(w_q.transpose(1, 2, 0))).reshape(b, -1, c)
        k_in = (k_in / self._sqrt_head_dim()).astype(dt)
        b_q = self.q_proj.bias[...].astype(dt).astype(F32)
        shift = (kh.astype(F32) * b_q).reshape(b, tk, h, -1).sum(-1).reshape(b, 1, -1)
        logits = jnp.einsum("bqc,byc->bqy", q.astype(dt), k_in, preferred_element_type=F32)
        logits = (logits.astype(F32) + shift / self._sqrt_head_dim()).reshape(b, -1, tk, h)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, :, None], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=2).reshape(b, -1, tk * h)
        w_o = self.out_proj.kernel[...].reshape(h, -1, c)  # (H, E, C)
        v_out = (vh @ self._blocks(w_o)).reshape(b, -1, c)
        out = jnp.einsum("bqy,byc->bqc", probs.astype(dt), v_out)
        return (out + self.out_proj.bias[...].astype(dt)).astype(F32)


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
