"""`convert_torch_weights.py`: conversion, strictness, bad input, verification, export."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sammed3d_jax.checkpoint import load_model, read_torch_checkpoint
from sammed3d_jax.convert.pth import find_state_dict, load_pth, save_pth
from sammed3d_jax.convert.torch_to_jax import flax_state_to_torch, infer_config
from sammed3d_jax.model.config import matching_variant
from tests.conftest import REPO

GOLDEN_PTH = REPO / "tests" / "fixtures" / "golden_small" / "checkpoint_train_format.pth"


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "convert_torch_weights.py"), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def golden_sd() -> dict[str, np.ndarray]:
    return dict(find_state_dict(load_pth(GOLDEN_PTH))[0])


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "small"
    proc = run_cli(GOLDEN_PTH, out)
    assert proc.returncode == 0, proc.stderr
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_training_format_checkpoint_converts(converted):
    assert (converted / "params").is_dir()
    cfg = json.loads((converted / "config.json").read_text())
    assert (cfg["img_size"], cfg["encoder_embed_dim"], cfg["encoder_depth"]) == (64, 96, 3)
    assert (cfg["encoder_num_heads"], cfg["window_size"], cfg["prompt_embed_dim"]) == (4, 6, 48)
    assert cfg["encoder_global_attn_indexes"] == [1]
    report = json.loads((converted / "conversion_report.json").read_text())
    assert report["weights_found_at"] == "checkpoint['model_state_dict']"
    assert report["num_torch_keys"] == 189 and report["num_parameters"] == 1_351_234
    assert len(report["mapping"]) == 189
    assert "optimizer_state_dict" in report["other_top_level_keys"]


def test_converted_equals_direct_pth_load(converted, golden_sd):
    a = flax_state_to_torch(nnx.state(load_model(converted)))
    b = flax_state_to_torch(nnx.state(load_model(GOLDEN_PTH)))
    assert a.keys() == golden_sd.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], golden_sd[k])
        np.testing.assert_array_equal(b[k], golden_sd[k])


def test_load_model_overrides_numerics_only(converted):
    assert load_model(converted, dtype="bfloat16").config.dtype == "bfloat16"
    for path in (converted, GOLDEN_PTH):
        for bad in ({"decoder_num_heads": 1}, {"encoder_norm_eps": 0.5}, {"bogus": 1}):
            with pytest.raises(ValueError, match=f"{next(iter(bad))} cannot be changed"):
                load_model(path, **bad)


@pytest.mark.parametrize(
    "prefix",
    ["", "module.", "_orig_mod.", "module._orig_mod."],
    ids=["bare", "ddp", "compiled", "both"],
)
def test_other_layouts_convert(tmp_path, golden_sd, prefix):
    """Wrapper prefixes of DDP and torch.compile (a compiled model's state dict) go."""
    src = tmp_path / "weights.pth"
    save_pth(src, {f"{prefix}{k}": v for k, v in golden_sd.items()})
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["prefix_stripped"] == prefix
    assert report["ddp_prefix_stripped"] is ("module." in prefix)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("missing", "1 missing keys"),
        ("unexpected", "1 unexpected keys"),
        ("misshaped", "mis-shaped"),
        ("nan", "iou_token.weight: 1 of 48 values are NaN or infinite"),
        ("wrong_arch", "missing keys"),
    ],
)
def test_mismatched_state_dicts_are_rejected_and_nothing_is_written(
    tmp_path, golden_sd, damage, expected
):
    sd = dict(golden_sd)
    if damage == "missing":
        del sd["mask_decoder.iou_token.weight"]
    elif damage == "unexpected":
        sd["mask_decoder.extra.weight"] = np.zeros(3, np.float32)
    elif damage == "misshaped":
        sd["mask_decoder.iou_token.weight"] = np.zeros((1, 47), np.float32)
    elif damage == "nan":
        sd["mask_decoder.iou_token.weight"] = np.array(sd["mask_decoder.iou_token.weight"])
        sd["mask_decoder.iou_token.weight"][0, 3] = np.nan
    else:  # a decoder from another architecture: drop every hypernetwork MLP but one
        sd = {k: v for k, v in sd.items() if "output_hypernetworks_mlps.3" not in k}
        sd["mask_decoder.mask_tokens.weight"] = sd["mask_decoder.mask_tokens.weight"]
    src = tmp_path / "bad.pth"
    save_pth(src, sd)
    out = tmp_path / "out"
    proc = run_cli(src, out)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_corrupt_and_missing_files(tmp_path):
    data = GOLDEN_PTH.read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "random.pth": os.urandom(4096),
        "empty.pth": b"",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    for name in [*cases, "does_not_exist.pth"]:
        out = tmp_path / f"out_{name}"
        proc = run_cli(tmp_path / name, out)
        assert proc.returncode == 2, (name, proc.stderr)
        line = proc.stderr.strip().splitlines()
        assert len(line) == 1 and name in line[0] and "Traceback" not in proc.stderr
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_damaged_converted_checkpoint_is_one_line(tmp_path, converted):
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    for f in (damaged / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:100])
    image = REPO / "demo_data" / "val" / "imagesTr" / "totalseg_ct_pelvis_0000.nii.gz"
    argv = ["segment", "--image", image, "--checkpoint", damaged, "--point", "60,50,40"]
    proc = subprocess.run(
        [sys.executable, "-m", "sammed3d_jax", *map(str, argv), "--out", str(tmp_path / "m.nii")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"{damaged / 'params'}: cannot restore parameters: " in line
    assert not (tmp_path / "m.nii").exists()


def test_checkpoint_folder_names_must_be_utf8(tmp_path, converted):
    from sammed3d_jax.checkpoint import CheckpointError

    odd = tmp_path / ("ckpt" + os.fsdecode(b"\xff"))
    shutil.copytree(converted, odd)
    with pytest.raises(CheckpointError, match="must have names that are valid UTF-8"):
        load_model(odd)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil.pth"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"model_state_dict": Payload()}, protocol=2))
        zf.writestr("evil/version", "3\n")
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2
    assert "system" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, converted):
    out = tmp_path / "exists"
    out.mkdir()
    proc = run_cli(GOLDEN_PTH, out)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run_cli(GOLDEN_PTH, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "params").is_dir()


def test_export_round_trip_is_identical(tmp_path, converted, golden_sd):
    exported = tmp_path / "roundtrip.pth"
    proc = run_cli(converted, exported, "--export")
    assert proc.returncode == 0, proc.stderr
    back, info = read_torch_checkpoint(exported)
    assert info["weights_found_at"] == "checkpoint['model_state_dict']"
    assert back.keys() == golden_sd.keys()
    for k in back:
        np.testing.assert_array_equal(back[k], golden_sd[k])


@pytest.mark.torch
def test_export_loads_in_medim_and_pytorch_gives_identical_tensors(tmp_path, converted, golden_sd):
    torch = pytest.importorskip("torch")
    pytest.importorskip("medim")
    from sammed3d_jax.convert.verify import build_reference

    exported = tmp_path / "roundtrip.pth"
    assert run_cli(converted, exported, "--export").returncode == 0
    bare = tmp_path / "bare.pth"
    assert run_cli(converted, bare, "--export", "--bare").returncode == 0
    ckpt = torch.load(exported, weights_only=True)
    ref = build_reference(load_model(converted).config)
    ref.load_state_dict(ckpt["model_state_dict"], strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, torch.from_numpy(golden_sd[k])), k
    assert torch.load(bare, weights_only=True).keys() == ckpt["model_state_dict"].keys()


@pytest.mark.torch
def test_verify_against_pytorch_reference(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("medim")
    proc = run_cli(GOLDEN_PTH, tmp_path / "v", "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"]
    assert {
        "image_embedding",
        "low_res_masks",
        "iou_multimask",
        "low_res_masks_no_mask_input",
    } <= set(result["outputs"])
    assert all(v["max_rel"] < 1e-4 for v in result["outputs"].values())


def test_point_mask_slots_are_exactly_ignored(converted):
    """Padding the click list with masked slots gives the same logits as no padding."""
    model = load_model(converted)
    rng = np.random.default_rng(0)
    emb = model.encode(jnp.asarray(rng.standard_normal((1, 64, 64, 64), np.float32)))
    pts = jnp.asarray(rng.uniform(0, 63, (1, 2, 3)), jnp.float32)
    lab = jnp.asarray([[1, 0]])
    ref = model.decode(emb, pts, lab, None).low_res_logits
    padded_pts = jnp.concatenate([pts, jnp.asarray(rng.uniform(0, 63, (1, 5, 3)), jnp.float32)], 1)
    padded_lab = jnp.concatenate([lab, jnp.asarray([[1, 0, 1, -1, 1]])], 1)
    mask = jnp.asarray([[True, True, False, False, False, False, False]])
    out = model.decode(emb, padded_pts, padded_lab, None, point_mask=mask).low_res_logits
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-6)


def test_grid_without_pos_embed_is_not_guessed(golden_sd):
    """Without pos_embed the tables' sizes (grid 4 for the global block, window 6) cannot
    say which is the grid: the converter asks for img_size instead of guessing wrong."""
    from sammed3d_jax.convert.torch_to_jax import ConversionError, infer_config

    full = infer_config(golden_sd)
    sd = {k: v for k, v in golden_sd.items() if k != "image_encoder.pos_embed"}
    with pytest.raises(ConversionError, match="pass img_size"):
        infer_config(sd)
    assert infer_config(sd, img_size=full.img_size) == full.replace(use_abs_pos=False)


def test_arguments_that_cannot_apply_are_refused(tmp_path, converted, capsys):
    from convert_torch_weights import main

    before = {f.name: f.read_bytes() for f in converted.iterdir() if f.is_file()}
    cases = [
        ([converted, tmp_path / "out"], "is a folder; converting reads a .pth file"),
        (
            [converted, converted / "config.json", "--export", "--overwrite"],
            "inside the checkpoint being exported",
        ),
        ([converted, tmp_path / "x.pth", "--export", "--seed", "3"], "--seed applies to --verify"),
    ]
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert {f.name: f.read_bytes() for f in converted.iterdir() if f.is_file()} == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.pth").exists()
    # Usage errors are one line too.
    for argv, message in (
        ([converted, tmp_path / "out", "--img-size", "abc"], "invalid int value"),
        ([converted], "required: dst"),
    ):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_mlp_width_is_rebuilt_exactly():
    """hidden / dim can round one ulp low and truncate one short (115 / 56 -> 114)."""
    from sammed3d_jax.convert.torch_to_jax import _ratio_for

    assert int(56 * (115 / 56)) == 114  # the failure the ratio must avoid
    for dim in range(1, 1300, 7):
        for hidden in range(dim, 4 * dim + 1, max(1, dim // 5)):
            assert int(dim * _ratio_for(hidden, dim)) == hidden, (dim, hidden)


def test_export_to_an_unwritable_place_is_a_one_line_error(tmp_path, converted):
    (tmp_path / "afile").write_text("x")
    proc = run_cli("--export", converted, tmp_path / "afile" / "out.pth")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "afile is a file, not a folder" in proc.stderr
    proc = run_cli("--export", converted, tmp_path / "new_dir" / "out.pth")  # created
    assert proc.returncode == 0 and (tmp_path / "new_dir" / "out.pth").is_file(), proc.stderr


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path, converted):
    """A converted checkpoint whose config.json was changed (another window or MLP width)
    must not load with the stored arrays silently reinterpreted."""
    import shutil

    from sammed3d_jax.checkpoint import CheckpointError

    for field, value in (("window_size", 4), ("mlp_ratio", 2.0)):
        copy = tmp_path / f"edited_{field}"
        shutil.copytree(converted, copy)
        cfg = json.loads((copy / "config.json").read_text())
        cfg[field] = value
        (copy / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match="shape") as info:
            load_model(copy)
        assert str(copy) in str(info.value)


def test_errors_name_the_file_and_odd_architectures_are_refused(tmp_path, golden_sd):
    from sammed3d_jax.checkpoint import CheckpointError

    # Another model's weights: the message names the file, for the CLI and load_model.
    other = tmp_path / "other_model.pth"
    save_pth(other, {"linear.weight": np.zeros((2, 2), np.float32)})
    proc = run_cli(other, tmp_path / "out_other")
    assert proc.returncode == 2 and str(other) in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(CheckpointError, match=r"other_model\.pth"):
        load_model(other)
    # A checkpoint that lost its last block (or every qkv bias) would read as a smaller
    # model: refused unless the architecture is declared intended.
    lost = {
        "two_blocks": {k: v for k, v in golden_sd.items() if ".blocks.2." not in k},
        "no_qkv_bias": {k: v for k, v in golden_sd.items() if not k.endswith("attn.qkv.bias")},
    }
    for name, sd in lost.items():
        src = tmp_path / f"{name}.pth"
        save_pth(src, sd)
        proc = run_cli(src, tmp_path / f"out_{name}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "architecture of no known variant" in proc.stderr and str(src) in proc.stderr
        assert not (tmp_path / f"out_{name}").exists()
        with pytest.raises(CheckpointError, match="no known variant"):
            load_model(src)
    proc = run_cli(src, tmp_path / "custom", "--allow-custom-architecture")
    assert proc.returncode == 0, proc.stderr
    assert "custom architecture" in proc.stderr
    assert not load_model(src, allow_custom_architecture=True).config.qkv_bias
    assert matching_variant(infer_config(golden_sd)) == "small"  # no warning for it
    # Tensors of the wrong rank: one line naming the key, not an IndexError.
    for key, value in (
        ("image_encoder.pos_embed", np.zeros(4, np.float32)),
        ("image_encoder.blocks.0.attn.rel_pos_d", np.zeros(11, np.float32)),
        ("image_encoder.blocks.0.attn.rel_pos_d", np.zeros((11, 0), np.float32)),
    ):
        src = tmp_path / "bad_rank.pth"
        save_pth(src, {**golden_sd, key: value})
        proc = run_cli(src, tmp_path / "out_rank")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{key} has shape {value.shape}" in proc.stderr


def test_output_never_replaces_the_source_and_gets_umask_permissions(tmp_path):
    import shutil

    src = tmp_path / "w.pth"
    shutil.copy(GOLDEN_PTH, src)
    proc = run_cli(src, src, "--overwrite")
    assert proc.returncode == 2 and "replace the source" in proc.stderr
    assert src.is_file() and src.read_bytes() == GOLDEN_PTH.read_bytes()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    proc = run_cli(src, a_file, "--overwrite")
    assert proc.returncode == 2 and "is a file" in proc.stderr
    assert a_file.read_text() == "keep me" and leftovers(tmp_path) == []
    old = os.umask(0o022)
    try:
        out = tmp_path / "perm"
        assert run_cli(src, out).returncode == 0
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755


def test_verify_without_the_reference_leaves_nothing(tmp_path):
    """--verify needs PyTorch and medim: without them, one error line and no output."""
    fake = tmp_path / "fake"
    (fake / "medim").mkdir(parents=True)
    (fake / "medim" / "__init__.py").write_text("raise ImportError('medim is not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{REPO}"}
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "convert_torch_weights.py"), str(GOLDEN_PTH), str(out)]
    proc = subprocess.run(
        [*cmd, "--verify"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs PyTorch and medim" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
