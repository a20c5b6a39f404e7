"""``python -m sammed3d_jax segment``: outputs on the input grid, overlay, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.__main__ import main, parse_point

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def paths(fixtures_dir):
    return {
        "image": fixtures_dir / "preprocess" / "t2.nii.gz",
        "ckpt": fixtures_dir / "golden_small" / "checkpoint_train_format.pth",
    }


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _argparse_exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def test_parse_point():
    assert parse_point("1,2,3") == (1.0, 2.0, 3.0, 1)
    assert parse_point(" 1.5, -2 ,3,0") == (1.5, -2.0, 3.0, 0)
    for bad in ("1,2", "1,2,3,4,5", "a,2,3", "1,2,3,2", "1,,3", "1,2,inf"):
        with pytest.raises(Exception, match="malformed point"):
            parse_point(bad)


def test_segment_subprocess_writes_mask_and_png(paths, tmp_path):
    out = tmp_path / "sub" / "mask.nii.gz"
    png = tmp_path / "overlay.png"
    cmd = [
        sys.executable,
        "-m",
        "sammed3d_jax",
        "segment",
        "--image",
        str(paths["image"]),
        "--checkpoint",
        str(paths["ckpt"]),
        "--point",
        "30,27,26",
        "--point",
        "30,20,26,0",
        "--out",
        str(out),
        "--png",
        str(png),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    ref = nib.load(paths["image"])
    img = nib.load(out)
    assert img.shape == ref.shape
    np.testing.assert_array_equal(img.affine, ref.affine)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(ref.affine) == ("P", "S", "R")
    assert int(img.header["qform_code"]) == int(ref.header["qform_code"])
    assert int(img.header["sform_code"]) == int(ref.header["sform_code"])
    data = np.asarray(img.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 300
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_segment_mm_and_voxel_clicks_agree(paths, tmp_path, capsys):
    from sammed3d_jax.data import load_volume, voxel_to_world

    vol = load_volume(paths["image"])
    mm = voxel_to_world(vol.affine, np.array([[30.0, 27.0, 26.0]]))[0]
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    base = ["segment", "--image", str(paths["image"]), "--checkpoint", str(paths["ckpt"])]
    assert _run([*base, "--point", "30,27,26", "--out", str(a)], capsys)[0] == 0
    point = ",".join(f"{v:.10f}" for v in mm)
    assert _run([*base, "--point", point, "--mm", "--out", str(b)], capsys)[0] == 0
    np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())


def test_segment_png_of_an_oddly_named_image(paths, tmp_path, capsys):
    """The overlay's title holds the file name: mathtext and bytes that are not UTF-8."""
    image = tmp_path / ("p$^$q" + os.fsdecode(b"\xff") + ".nii.gz")
    image.symlink_to(paths["image"])
    out, png = tmp_path / "m.nii.gz", tmp_path / "m.png"
    argv = ["segment", "--image", str(image), "--checkpoint", str(paths["ckpt"])]
    code, _, err = _run(
        [*argv, "--point", "30,27,26", "--out", str(out), "--png", str(png)], capsys
    )
    assert code == 0, err
    assert out.exists() and png.stat().st_size > 1000


def test_segment_tile(paths, tmp_path, capsys):
    out = tmp_path / "tiled.nii"
    code, stdout, _ = _run(
        [
            "segment",
            "--image",
            str(paths["image"]),
            "--checkpoint",
            str(paths["ckpt"]),
            "--point",
            "30,27,26",
            "--tile",
            "--max-windows",
            "3",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "window" in stdout
    assert nib.load(out).shape == (60, 55, 52)


def test_segment_tile_says_when_the_window_limit_cut_it(paths, tmp_path, capsys, monkeypatch):
    from sammed3d_jax.inference import Predictor

    tiled = Predictor.predict_tiled

    def at_the_limit(self, *args, **kwargs):  # a target longer than the windows allowed
        result = tiled(self, *args, **kwargs)
        tiling = dataclasses.replace(result.tiling, reached_max_windows=True)
        return dataclasses.replace(result, tiling=tiling)

    monkeypatch.setattr(Predictor, "predict_tiled", at_the_limit)
    argv = ["segment", "--image", str(paths["image"]), "--checkpoint", str(paths["ckpt"])]
    argv += ["--point", "30,27,26", "--tile", "--max-windows", "1"]
    code, stdout, err = _run([*argv, "--out", str(tmp_path / "m.nii")], capsys)
    assert code == 0 and "window limit reached" in stdout
    assert "--max-windows 1 reached" in err


def _write(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


@pytest.mark.parametrize(
    ("case", "point", "extra", "message"),
    [
        ("missing", "1,1,1", [], "file not found"),
        ("text", "1,1,1", [], "cannot be read as NIfTI"),
        ("2d", "1,1,1", [], "expected a 3D volume"),
        ("4d", "1,1,1", [], "expected a 3D volume"),
        ("nan", "1,1,1", [], "non-finite"),
        ("complex", "1,1,1", [], "complex voxel data"),
        ("thin", "20,20,1", [], "less than one 1.5 mm voxel"),
        ("good", "10,10,40", [], "outside the image"),
        ("good", "-5,1,1", [], "outside the image"),
        ("good", "0,0,0", ["--mm"], "outside the image"),
        ("good", "1,1,1,0", [], "at least one foreground click"),
        ("good", "1,1,1", ["--checkpoint-missing"], "no such file"),
        ("good", "1,1,1", ["--bad-out"], "must end in .nii"),
    ],
)
def test_segment_input_errors(case, point, extra, message, paths, tmp_path, capsys):
    image = tmp_path / "img.nii.gz"
    rng = np.random.default_rng(0)
    if case == "text":
        image.write_text("not a nifti file")
    elif case == "2d":
        _write(image, rng.random((20, 20)).astype(np.float32))
    elif case == "4d":
        _write(image, rng.random((20, 20, 20, 2)).astype(np.float32))
    elif case == "nan":
        a = rng.random((20, 20, 20)).astype(np.float32)
        a[1, 2, 3] = np.nan
        _write(image, a)
    elif case == "complex":
        _write(image, (rng.random((20, 20, 20)) + 1j).astype(np.complex64))
    elif case == "thin":  # 1 mm thick: no voxel of the 1.5 mm model grid fits
        _write(image, rng.random((40, 40, 2)).astype(np.float32), np.diag([1.0, 1.0, 0.5, 1.0]))
    elif case == "good":
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = 500
        _write(image, rng.random((20, 20, 20)).astype(np.float32), affine)
    out = tmp_path / "mask.nii.gz"
    ckpt = str(tmp_path / "nope.pth") if "--checkpoint-missing" in extra else str(paths["ckpt"])
    if "--bad-out" in extra:
        out = tmp_path / "mask.png"
    flags = [e for e in extra if e == "--mm"]
    argv = ["segment", "--image", str(image), "--checkpoint", ckpt, "--point", point]
    code, _, err = _run([*argv, *flags, "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob("mask*"))


def test_segment_output_paths_are_checked_before_any_work(paths, tmp_path, capsys):
    """An output that would replace the input, or that cannot be written, fails at once with
    the argument's name, and nothing is written (not even the mask when only --png is bad)."""
    image = tmp_path / "img.nii.gz"
    image.write_bytes(paths["image"].read_bytes())
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.nii.gz").mkdir()
    base = ["segment", "--image", str(image), "--checkpoint", str(paths["ckpt"])]
    base += ["--point", "30,27,26"]
    mask = tmp_path / "mask.nii.gz"
    for extra, message in (
        (["--out", str(image)], "is the input file"),
        (["--out", str(tmp_path / "folder.nii.gz")], "is a folder"),
        (["--out", str(mask), "--png", str(tmp_path / "afile" / "o.png")], "--png"),
    ):
        code, _, err = _run([*base, *extra], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert image.read_bytes() == paths["image"].read_bytes()
    assert not mask.exists()


def test_segment_replaces_an_existing_output_only_with_overwrite(paths, tmp_path, capsys):
    out, png = tmp_path / "mask.nii.gz", tmp_path / "mask.png"
    out.write_bytes(b"keep me")
    png.write_bytes(b"keep me too")
    base = ["segment", "--image", str(paths["image"]), "--checkpoint", str(paths["ckpt"])]
    base += ["--point", "30,27,26", "--out", str(out), "--png", str(png)]
    code, _, err = _run(base, capsys)
    assert code == 2 and "--out" in err and "--overwrite" in err, err
    assert len(err.strip().splitlines()) == 1
    out.unlink()
    code, _, err = _run(base, capsys)  # only the overlay exists now
    assert code == 2 and "--png" in err and "--overwrite" in err, err
    assert not out.exists() and png.read_bytes() == b"keep me too"
    code, _, err = _run([*base, "--overwrite"], capsys)
    assert code == 0, err
    assert nib.load(out).shape == nib.load(paths["image"]).shape
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("failing", ["overlay", "mask"])
def test_segment_failing_output_leaves_neither_file(failing, paths, tmp_path, capsys, monkeypatch):
    """Mask and overlay land together: a rerun after a failure needs no --overwrite."""
    import errno

    from sammed3d_jax.data import nifti
    from sammed3d_jax.inference import overlay

    module, name = (overlay, "save_overlay_png") if failing == "overlay" else (nifti, "save_mask")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, name, full_disk)
    out, png = tmp_path / "m.nii.gz", tmp_path / "m.png"
    argv = ["segment", "--image", str(paths["image"]), "--checkpoint", str(paths["ckpt"])]
    code, _, err = _run(
        [*argv, "--point", "30,27,26", "--out", str(out), "--png", str(png)], capsys
    )
    assert code == 2 and "No space left" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "point", ["1,2", "1,2,3,7", "x,2,3", "1;2;3", "1,2,3,1,0"], ids=lambda p: repr(p)
)
def test_segment_malformed_point(point, paths, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    argv = ["segment", "--image", str(paths["image"]), "--checkpoint", str(paths["ckpt"])]
    code, err = _argparse_exit([*argv, "--point", point, "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "malformed point" in lines[0], err
    assert not out.exists()


def test_segment_subprocess_error_exit_code(tmp_path):
    out = tmp_path / "mask.nii.gz"
    cmd = [sys.executable, "-m", "sammed3d_jax", "segment", "--image", str(tmp_path / "x.nii")]
    cmd += ["--checkpoint", "ckpt", "--point", "1,2,3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "file not found" in proc.stderr and "x.nii" in proc.stderr
    assert not out.exists()
    proc = subprocess.run(
        [sys.executable, "-m", "sammed3d_jax", "segment", "--image", "a.nii"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "required" in proc.stderr


def _fake_run(root, spacing):
    """A train.py workdir as far as the spacing lookup reads it."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"data": {"spacing": spacing}}))
    return root


def test_spacing_default_comes_from_the_training_run(paths, tmp_path):
    from sammed3d_jax.checkpoint import recorded_spacing
    from sammed3d_jax.eval.runner import RunnerError, resolve_spacing

    run = _fake_run(tmp_path / "run", [3.0, 3.0, 2.5])
    assert recorded_spacing(run) == (3.0, 3.0, 2.5)
    assert resolve_spacing(None, run) == (3.0, 3.0, 2.5)
    assert resolve_spacing(2.0, run) == (2.0, 2.0, 2.0)  # an explicit value wins
    assert resolve_spacing([1, 2, 3], None) == (1.0, 2.0, 3.0)
    # Converted checkpoints and .pth files carry no spacing: the released models' 1.5 mm.
    assert recorded_spacing(paths["ckpt"]) is None
    assert resolve_spacing(None, paths["ckpt"]) == (1.5, 1.5, 1.5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RunnerError, match="--spacing must be a positive, finite number"):
            resolve_spacing(bad, None)
    with pytest.raises(RunnerError, match="--spacing must be one number of mm"):
        resolve_spacing([1.0, 2.0], None)
    broken = _fake_run(tmp_path / "broken", [3.0, -1.0, 3.0])
    with pytest.raises(RunnerError, match=r"data\.spacing must be positive"):
        resolve_spacing(None, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(RunnerError, match=r"no valid data\.spacing"):
        resolve_spacing(None, broken)


def test_predictor_from_checkpoint_uses_the_recorded_spacing(paths, tmp_path, monkeypatch):
    """The Python API picks the grid as the commands do: a training run's own spacing."""
    import sammed3d_jax.checkpoint as checkpoint
    from sammed3d_jax.inference import Predictor

    model = checkpoint.load_model(paths["ckpt"])
    run = _fake_run(tmp_path / "run", [3.0, 3.0, 2.5])
    monkeypatch.setattr(checkpoint, "load_model", lambda path, **kw: model)
    assert Predictor.from_checkpoint(run).spacing == (3.0, 3.0, 2.5)
    assert Predictor.from_checkpoint(run, spacing=2.0).spacing == (2.0, 2.0, 2.0)
    assert Predictor.from_checkpoint(paths["ckpt"]).spacing == (1.5, 1.5, 1.5)
