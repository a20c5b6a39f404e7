"""Run in a subprocess with 8 fake CPU devices: sharded train steps vs one device.

Prints one JSON line with, per mesh, the losses and the max relative difference of every
parameter after two SGD steps (SGD: the comparison shows the sharded arithmetic itself;
Adam's m / sqrt(v) would amplify rounding in near-zero gradients), and, with AdamW, the
parameters and optimizer moments left replicated under each mesh.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sammed3d_jax import Sam3DConfig, abstract_sam3d, build_sam3d  # noqa: E402
from sammed3d_jax import sharding as sh  # noqa: E402
from sammed3d_jax.train.optim import OptimConfig, make_optimizer  # noqa: E402
from sammed3d_jax.train.step import (  # noqa: E402
    TrainConfig,
    TrainState,
    make_train_step,
    normalize_images,
)

MESHES = {"8,1,1": (8, 1, 1), "2,4,1": (2, 4, 1), "2,2,2": (2, 2, 2), "1,8,1": (1, 8, 1)}


@contextlib.contextmanager
def gpu_forms():
    """The model's GPU-only forms switched on (whatever the backend)."""
    from sammed3d_jax.model import image_encoder, mask_decoder, transformer

    saved = (
        image_encoder.unrolled_logsumexp,
        mask_decoder.token_multiple,
        transformer.heads_as_blocks,
    )
    image_encoder.unrolled_logsumexp = lambda: True
    mask_decoder.token_multiple = lambda: 8
    transformer.heads_as_blocks = lambda: True
    try:
        yield
    finally:
        (
            image_encoder.unrolled_logsumexp,
            mask_decoder.token_multiple,
            transformer.heads_as_blocks,
        ) = saved


def main() -> None:
    # Two decoder heads, so that the cross-attention takes its few-token paths (the GPU-only
    # forms below change those).
    cfg = Sam3DConfig.from_variant("tiny", decoder_num_heads=2)
    model = build_sam3d(cfg, seed=1)
    graphdef, params0, rest0 = nnx.split(model, nnx.Param, ...)
    # One click: its position depends only on the label. Later clicks are drawn from the
    # thresholded previous prediction, where a rounding-level change can move a click.
    train_cfg = TrainConfig(num_clicks=1, no_point_low=0, no_point_high=0)
    sgd = optax.sgd(0.05)
    adamw = make_optimizer(params0, OptimConfig(lr=1e-3))
    rng = np.random.default_rng(0)
    image = (rng.standard_normal((8, 64, 64, 64)) * 50 + 20).astype(np.float32)
    label = np.zeros((8, 64, 64, 64), np.uint8)
    for i in range(8):
        c = rng.integers(16, 48, 3)
        label[i, c[0] - 8 : c[0] + 8, c[1] - 6 : c[1] + 6, c[2] - 10 : c[2] + 10] = 1
    key = jax.random.key(0)

    def run(mesh, tx):
        step = make_train_step(graphdef, tx, train_cfg)
        p_sh = sh.state_shardings(params0, mesh)
        r_sh = sh.state_shardings(rest0, mesh)
        # From host copies: the step donates its input buffers.
        params = jax.device_put(jax.tree_util.tree_map(np.asarray, params0), p_sh)
        rest = jax.device_put(jax.tree_util.tree_map(np.asarray, rest0), r_sh)
        opt = sh.init_optimizer_state(tx, params, p_sh, mesh)
        step0 = jax.device_put(np.zeros((), np.int32), sh.replicated(mesh))
        state = TrainState(step0, params, rest, opt)
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        b_sh = sh.batch_sharding(mesh, 4)
        batch = {"image": jax.device_put(image, b_sh), "label": jax.device_put(label, b_sh)}
        fn = jax.jit(
            step,
            in_shardings=(state_sh, {"image": b_sh, "label": b_sh}, sh.replicated(mesh)),
            out_shardings=(state_sh, sh.replicated(mesh)),
            donate_argnums=0,
        )
        losses = []
        with sh.use_mesh(mesh):
            for _ in range(2):
                state, m = fn(state, batch, key)
                losses.append(float(jax.block_until_ready(m["loss"])))
        return state, losses

    single = sh.make_mesh({"data": 1}, jax.devices()[:1])
    ref_state, ref_losses = run(single, sgd)
    ref_params = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(ref_state.params)
    }
    init_params = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params0)
    }
    # Differences are measured against the largest parameter update of the reference run:
    # several parameters have exactly zero true gradient (key biases, untouched heads), so a
    # per-parameter relative error would only compare rounding noise with itself.
    update_scale = max(np.abs(ref_params[k] - init_params[k]).max() for k in ref_params)

    out = {
        "reference_losses": ref_losses,
        "reference_update_scale": float(update_scale),
        "meshes": {},
    }
    for name, shape in MESHES.items():
        mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
        state, losses = run(mesh, sgd)
        worst = 0.0
        for p, v in jax.tree_util.tree_leaves_with_path(state.params):
            r = ref_params[jax.tree_util.keystr(p)]
            worst = max(worst, float(np.abs(np.asarray(v) - r).max() / update_scale))
        # AdamW state as the trainer creates it (the step keeps these shardings: they are
        # its out_shardings).
        p_sh = sh.state_shardings(params0, mesh)
        params = jax.device_put(jax.tree_util.tree_map(np.asarray, params0), p_sh)
        adam_opt = sh.init_optimizer_state(adamw, params, p_sh, mesh)
        out["meshes"][name] = {
            "losses": losses,
            "max_param_diff_over_update_scale": worst,
            # parameters and optimizer moments of >= 16 kB that stay fully replicated
            "replicated_params": sh.replicated_large_arrays(state.params, 16 << 10),
            "replicated_opt_state": sh.replicated_large_arrays(adam_opt, 16 << 10),
            "bytes_per_device_params": sh.nbytes_per_device(state.params),
            "bytes_per_device_opt_state": sh.nbytes_per_device(adam_opt),
        }
    # The forms chosen on GPUs only (unrolled log-sum-exps, filler tokens, block-diagonal
    # head maps), switched on under a tensor-parallel mesh, against one device with the CPU
    # forms.
    with gpu_forms():
        gpu_state, gpu_losses = run(sh.make_mesh(dict(zip(sh.MESH_AXES, (2, 2, 2)))), sgd)
    out["gpu_forms_2,2,2"] = {
        "losses": gpu_losses,
        "reference_losses": ref_losses,
        "max_param_diff_over_update_scale": max(
            float(np.abs(np.asarray(v) - ref_params[jax.tree_util.keystr(p)]).max() / update_scale)
            for p, v in jax.tree_util.tree_leaves_with_path(gpu_state.params)
        ),
    }
    # Full-size vit_b_ori under an 8-way fsdp mesh, from shapes alone (no memory).
    abstract = nnx.state(abstract_sam3d("vit_b_ori"), nnx.Param)
    mesh = sh.make_mesh({"fsdp": 8})
    specs = sh.state_specs(abstract, mesh)
    big_replicated = []
    for (path, leaf), (_, spec) in zip(
        jax.tree_util.tree_leaves_with_path(abstract),
        jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        ),
    ):
        nbytes = int(np.prod(leaf.shape)) * 4
        if nbytes >= 1 << 20 and all(s is None for s in spec):
            big_replicated.append(jax.tree_util.keystr(path))
    out["vit_b_ori_fsdp8_replicated_over_1MB"] = big_replicated
    # Batch statistics pooled over groups of 2 samples, the batch spread over 8 devices
    # (1 per device, so a group spans two devices) and over 4 (2 per device: local groups).
    norm = jax.jit(lambda x: normalize_images(x, "batch", None, 2))
    want = np.asarray(norm(image))
    out["grouped_normalization_max_diff"] = {}
    for devices in (8, 4):
        mesh = sh.make_mesh({"data": devices}, jax.devices()[:devices])
        got = np.asarray(norm(jax.device_put(image, sh.batch_sharding(mesh, 4))))
        out["grouped_normalization_max_diff"][str(devices)] = float(np.abs(got - want).max())
    # Groups of 4 over 24 samples on 8 devices (3 per device): no group lines up with a
    # device, yet no volume-sized array may be gathered (only the per-sample sums).
    mesh = sh.make_mesh({"data": 8})
    volumes = jax.device_put(
        np.tile(image[:1, :16, :16, :16], (24, 1, 1, 1)), sh.batch_sharding(mesh, 4)
    )
    hlo = jax.jit(lambda x: normalize_images(x, "batch", None, 4)).lower(volumes).compile()
    gathers = [
        re.search(r"=\s*(\S+)\s+all-gather(-start)?\(", x) for x in hlo.as_text().splitlines()
    ]
    out["grouped_normalization_gathers"] = [g[1] for g in gathers if g and "16,16,16" in g[1]]
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
