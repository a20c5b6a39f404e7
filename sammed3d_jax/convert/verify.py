"""Check a converted checkpoint against a live PyTorch reference (medim's SAM-Med3D modules).

Needs `torch` and `medim` (test/cross-check dependencies only). The reference is built with
the same architecture and loaded (strictly) with the same weights, read by the project's
safe `.pth` reader; both models then run on the same random inputs in float32.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sammed3d_jax.checkpoint import load_model, read_torch_checkpoint
from sammed3d_jax.model.config import VARIANTS, Sam3DConfig
from sammed3d_jax.model.sam import Sam3D


class ReferenceUnavailableError(RuntimeError):
    """PyTorch or medim (the reference model) is not installed."""


def require_reference() -> None:
    """Raise :class:`ReferenceUnavailableError` unless PyTorch and medim import."""
    try:
        import torch  # noqa: F401
        from medim.models import sam_med3d  # noqa: F401
    except ImportError as e:
        raise ReferenceUnavailableError(
            f"verification needs PyTorch and medim ({e}): pip install torch medim requests"
        ) from e


def build_reference(cfg: Sam3DConfig):
    """medim's PyTorch SAM-Med3D with this configuration (random weights, eval mode)."""
    require_reference()
    import torch
    from medim.models import sam_med3d as ref

    g = cfg.grid_size
    encoder = ref.ImageEncoderViT3D(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.prompt_embed_dim,
        qkv_bias=cfg.qkv_bias,
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.encoder_norm_eps),
        use_abs_pos=cfg.use_abs_pos,
        use_rel_pos=cfg.use_rel_pos,
        window_size=cfg.window_size,
        global_attn_indexes=list(cfg.encoder_global_attn_indexes),
    )
    prompt = ref.PromptEncoder3D(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(g, g, g),
        input_image_size=(cfg.img_size,) * 3,
        mask_in_chans=cfg.mask_in_chans,
    )
    decoder = ref.MaskDecoder3D(
        transformer_dim=cfg.prompt_embed_dim,
        num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    decoder.transformer = ref.TwoWayTransformer3D(
        depth=cfg.decoder_depth,
        embedding_dim=cfg.prompt_embed_dim,
        num_heads=cfg.decoder_num_heads,
        mlp_dim=cfg.decoder_mlp_dim,
        attention_downsample_rate=cfg.attention_downsample_rate,
    )
    return ref.SAM_Med3D(encoder, prompt, decoder).eval()


def load_reference(state_dict: dict[str, np.ndarray], cfg: Sam3DConfig):
    import torch

    model = build_reference(cfg)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True)
    return model


def random_inputs(cfg: Sam3DConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s, low = cfg.img_size, cfg.low_res_size
    return {
        "image": rng.standard_normal((1, 1, s, s, s)).astype(np.float32),
        "points": rng.uniform(0, s - 1, (1, 3, 3)).astype(np.float32),
        "labels": np.array([[1, 0, 1]], np.int64),
        "mask": rng.standard_normal((1, 1, low, low, low)).astype(np.float32),
    }


def run_reference(model, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    out = {}
    with torch.no_grad():
        emb = model.image_encoder(torch.from_numpy(x["image"]))
        pe = model.prompt_encoder.get_dense_pe()
        pts = (torch.from_numpy(x["points"]), torch.from_numpy(x["labels"]))
        sparse, dense = model.prompt_encoder(
            points=pts, boxes=None, masks=torch.from_numpy(x["mask"])
        )
        low, iou = model.mask_decoder(emb, pe, sparse, dense, multimask_output=False)
        low_m, iou_m = model.mask_decoder(emb, pe, sparse, dense, multimask_output=True)
        sparse0, dense0 = model.prompt_encoder(points=pts, boxes=None, masks=None)
        low0, iou0 = model.mask_decoder(emb, pe, sparse0, dense0, multimask_output=False)
    for name, t in dict(
        image_embedding=emb,
        dense_pe=pe,
        sparse=sparse,
        dense=dense,
        low_res_masks=low,
        iou=iou,
        low_res_masks_multimask=low_m,
        iou_multimask=iou_m,
        low_res_masks_no_mask_input=low0,
        iou_no_mask_input=iou0,
    ).items():
        out[name] = t.numpy()
    return out


def run_ours(model: Sam3D, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    nchw = lambda a: np.asarray(a).transpose(0, 4, 1, 2, 3)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        emb = model.encode(jnp.asarray(x["image"][:, 0]))
        pts, lab, mask = (jnp.asarray(x[k]) for k in ("points", "labels", "mask"))
        sparse, dense, _ = model.prompt_encoder((pts, lab), mask[:, 0])
        single = model.decode(emb, pts, lab, mask)
        multi = model.decode(emb, pts, lab, mask, multimask_output=True)
        nomask = model.decode(emb, pts, lab, None)
        pe = model.prompt_encoder.get_dense_pe()
    return dict(
        image_embedding=nchw(emb),
        dense_pe=nchw(pe),
        sparse=np.asarray(sparse),
        dense=nchw(dense),
        low_res_masks=np.asarray(single.low_res_logits),
        iou=np.asarray(single.iou_predictions),
        low_res_masks_multimask=np.asarray(multi.low_res_logits),
        iou_multimask=np.asarray(multi.iou_predictions),
        low_res_masks_no_mask_input=np.asarray(nomask.low_res_logits),
        iou_no_mask_input=np.asarray(nomask.iou_predictions),
    )


def verify_against_torch(
    src: str | os.PathLike, converted: str | os.PathLike, seed: int = 0
) -> dict[str, Any]:
    """Run the converted checkpoint and the PyTorch reference on random inputs."""
    state_dict, _ = read_torch_checkpoint(Path(src))
    ours_model = load_model(converted)
    cfg = ours_model.config
    reference = load_reference(state_dict, cfg)
    x = random_inputs(cfg, seed)
    ref_out = run_reference(reference, x)
    ours = run_ours(ours_model, x)
    tol = 3e-4 if cfg.replace(window_attention="exact") == VARIANTS["vit_b_ori"] else 1e-4
    outputs = {}
    for name, r in ref_out.items():
        d = float(np.max(np.abs(ours[name].astype(np.float64) - r)))
        scale = float(np.max(np.abs(r)))
        rel = d / scale if scale > 0 else d
        outputs[name] = {"max_abs": d, "max_rel": rel, "ok": rel <= tol}
    return {
        "ok": all(v["ok"] for v in outputs.values()),
        "tolerance_max_rel": tol,
        "outputs": outputs,
    }
