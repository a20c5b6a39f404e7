"""Architecture bookkeeping: parameter counts, key sets, config validation and inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from sammed3d_jax import Sam3DConfig, abstract_sam3d, build_sam3d, count_params
from sammed3d_jax.convert.torch_to_jax import (
    expected_torch_shapes,
    flax_state_to_torch,
    infer_config,
)
from sammed3d_jax.model import compute_dtype_weights


def test_vit_b_ori_param_count_without_memory():
    model = abstract_sam3d("vit_b_ori")  # jax.eval_shape: no arrays are allocated
    assert count_params(model) == 100_509_232
    parts = {
        name: count_params(getattr(model, name))
        for name in ("image_encoder", "prompt_encoder", "mask_decoder")
    }
    assert parts == {
        "image_encoder": 92_924_928,
        "prompt_encoder": 8_668,
        "mask_decoder": 7_575_636,
    }


def test_vit_b_ori_keys_match_the_reference_manifest(fixtures_dir):
    manifest = json.loads((fixtures_dir / "vit_b_ori_state_dict.json").read_text())["keys"]
    expected = {k: tuple(v["shape"]) for k, v in manifest.items()}
    ours = expected_torch_shapes(Sam3DConfig.from_variant("vit_b_ori"))
    assert ours == expected
    assert len(ours) == 324


@pytest.mark.parametrize(
    "changes",
    [
        dict(img_size=100),
        dict(encoder_num_heads=5),
        dict(encoder_global_attn_indexes=(12,)),
        dict(dtype="int8"),
        dict(window_attention="fast"),
        dict(prompt_embed_dim=100),
        dict(patch_size=0),
        dict(img_size=-16),
        dict(encoder_num_heads=0),
        dict(attention_downsample_rate=0),
        dict(mlp_ratio=0.0),
        dict(window_size="six"),  # hand-edited config.json: wrong types are named
        dict(qkv_bias="yes"),
        dict(encoder_global_attn_indexes=(2, "5")),
        dict(mlp_ratio=None),
    ],
)
def test_invalid_configs_are_rejected(changes):
    with pytest.raises(ValueError, match="invalid Sam3DConfig"):
        Sam3DConfig.from_variant("vit_b_ori", **changes)


@pytest.mark.parametrize(
    "cfg",
    [
        Sam3DConfig.from_variant("tiny"),
        Sam3DConfig.from_variant("small"),
        Sam3DConfig.from_variant(
            "tiny", img_size=96, window_size=4, encoder_global_attn_indexes=()
        ),
        Sam3DConfig.from_variant(
            "tiny",
            window_size=0,
            encoder_global_attn_indexes=(0, 1),
            qkv_bias=False,
            use_abs_pos=False,
        ),
        Sam3DConfig.from_variant(
            "tiny", num_multimask_outputs=2, iou_head_depth=2, mask_in_chans=8
        ),
    ],
)
def test_architecture_is_inferred_from_shapes(cfg):
    state_dict = flax_state_to_torch(nnx.state(build_sam3d(cfg)))
    assert infer_config(state_dict) == cfg


def test_config_json_round_trip():
    cfg = Sam3DConfig.from_variant("small", dtype="bfloat16")
    assert Sam3DConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown Sam3DConfig fields"):
        Sam3DConfig.from_dict({"img_sz": 64})


def test_state_dict_round_trip_is_exact():
    model = build_sam3d("tiny", seed=3)
    sd = flax_state_to_torch(nnx.state(model))
    from sammed3d_jax.checkpoint import model_from_state_dict

    again, _ = model_from_state_dict(sd)
    sd2 = flax_state_to_torch(nnx.state(again))
    assert sd.keys() == sd2.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd2[k])


def test_split_flat_round_trip_and_jit_argument():
    import jax

    from sammed3d_jax.model.sam import merge_flat, split_flat

    model = build_sam3d("tiny")
    state_leaves = jax.tree_util.tree_leaves(nnx.state(model))
    flatdef, leaves = split_flat(model, pack=False)
    assert isinstance(leaves, list)
    assert len(leaves) == len(state_leaves)
    rebuilt = merge_flat(flatdef, leaves)
    for a, b in zip(state_leaves, jax.tree_util.tree_leaves(nnx.state(rebuilt)), strict=True):
        assert a is b
    x = np.random.default_rng(0).standard_normal((1,) + (model.config.img_size,) * 3)
    x = x.astype(np.float32)
    graphdef, state = nnx.split(model)
    reference = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x))(state, x)
    for pack in (False, True):
        flatdef, leaves = split_flat(model, pack=pack)
        encode = jax.jit(lambda leaves, x, flatdef=flatdef: merge_flat(flatdef, leaves).encode(x))
        np.testing.assert_array_equal(np.asarray(encode(leaves, x)), np.asarray(reference))
        # Same architecture, other weights: the very same static half, so jit's cache
        # lookup is an identity check and no second compilation happens.
        assert split_flat(build_sam3d("tiny", seed=1), pack=pack)[0] is flatdef
        assert split_flat(build_sam3d("tiny", seed=1).image_encoder, pack=pack)[0] != flatdef
    assert split_flat(model, pack=True)[0] != split_flat(model, pack=False)[0]


def test_split_flat_packs_all_but_matmul_weights_and_biases():
    import jax

    from sammed3d_jax.model.sam import OWN_BUFFER_NAMES, merge_flat, split_flat

    model = compute_dtype_weights(build_sam3d(Sam3DConfig.from_variant("tiny", dtype="bfloat16")))
    with_paths = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    flatdef, leaves = split_flat(model)
    layers = {p[:-2] for p, _ in with_paths if p[-2].key == "kernel"}
    own = [
        i
        for i, (p, _) in enumerate(with_paths)
        if p[-2].key in OWN_BUFFER_NAMES or (p[-2].key == "bias" and p[:-2] in layers)
    ]
    # Matmul and convolution weights with their biases keep their own buffers; LayerNorm
    # biases do not.
    assert own and list(flatdef.own) == own
    norm = model.image_encoder.blocks[0].norm1.bias[...]
    assert not any(leaf is norm for leaf in leaves)
    # One 1-D buffer per dtype for the rest: here float32 norms, tables and embeddings.
    packed = leaves[len(own) :]
    assert [(b.dtype.name, b.ndim) for b in packed] == [("float32", 1)]
    assert len(with_paths) - len(own) > 20
    rebuilt = jax.tree_util.tree_leaves(nnx.state(merge_flat(flatdef, leaves)))
    for (_, a), b in zip(with_paths, rebuilt, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=f"expected {len(leaves)} arrays"):
        merge_flat(flatdef, leaves[:-1])


def test_flatdef_hash_is_computed_once(monkeypatch):
    from sammed3d_jax.model.sam import split_flat

    flatdef, _ = split_flat(build_sam3d("tiny"))
    calls = []
    graphdef_type = type(flatdef.graphdef)
    original = graphdef_type.__hash__
    monkeypatch.setattr(graphdef_type, "__hash__", lambda self: calls.append(1) or original(self))
    for _ in range(3):
        hash(flatdef)
        assert flatdef == flatdef
    assert not calls  # jit hashes static arguments on every call: this must stay cheap
