"""NIfTI loading, validation and atomic mask writing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.data.nifti import Volume, VolumeError, check_same_grid, load_volume, save_mask

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "preprocess"

PSR_AFFINE = np.array(
    [[0.0, 0.0, 1.0, -32.2], [-1.0, 0.0, 0.0, 31.8], [0.0, 1.0, 0.0, -19.3], [0, 0, 0, 1]]
)


def _write(path: Path, data: np.ndarray, affine: np.ndarray = PSR_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_load_fixture_matches_nibabel_order_and_dtype() -> None:
    for name, dtype in (("t2.nii.gz", np.int16), ("t2_seg-manual_labeled.nii.gz", np.float64)):
        path = FIXTURES / name
        vol = load_volume(path)
        ref = nib.load(str(path))
        assert vol.array.dtype == dtype
        assert vol.shape == (60, 55, 52)
        np.testing.assert_array_equal(vol.array, np.asarray(ref.dataobj))
        assert vol.affine.dtype == np.float64
        np.testing.assert_array_equal(vol.affine, ref.affine)
        np.testing.assert_allclose(vol.spacing, [1.0, 1.0, 1.0])
        assert vol.path == path


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(VolumeError, match="not found") as err:
        load_volume(path)
    assert str(path) in str(err.value)


def test_text_file_named_nifti(tmp_path: Path) -> None:
    path = tmp_path / "fake.nii.gz"
    path.write_text("this is not a NIfTI volume\n")
    with pytest.raises(VolumeError, match="cannot be read as NIfTI") as err:
        load_volume(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_non_nifti_image_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "vol.mgz"
    nib.save(nib.MGHImage(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))
    with pytest.raises(VolumeError, match="not a NIfTI") as err:
        load_volume(path)
    assert str(path) in str(err.value)


def test_2d_volume(tmp_path: Path) -> None:
    path = _write(tmp_path / "flat.nii.gz", np.zeros((8, 9), np.int16), np.eye(4))
    with pytest.raises(VolumeError, match="3D") as err:
        load_volume(path)
    assert str(path) in str(err.value)


def test_4d_volume(tmp_path: Path) -> None:
    path = _write(tmp_path / "series.nii.gz", np.zeros((5, 6, 7, 2), np.int16))
    with pytest.raises(VolumeError, match="4D") as err:
        load_volume(path)
    assert str(path) in str(err.value)


def test_4d_with_trailing_singleton_is_squeezed(tmp_path: Path) -> None:
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7, 1)
    vol = load_volume(_write(tmp_path / "one.nii.gz", data))
    assert vol.shape == (5, 6, 7) and vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, data[..., 0])
    # A mask written on its grid has the file's exact shape, singleton axis included.
    mask = (vol.array % 2).astype(np.uint8)
    out = nib.load(save_mask(tmp_path / "mask.nii.gz", mask, vol))
    assert out.shape == (5, 6, 7, 1)
    np.testing.assert_array_equal(np.asarray(out.dataobj)[..., 0], mask)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["image", "label"])
def test_non_finite_voxels(tmp_path: Path, bad: float, kind: str) -> None:
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = bad
    path = _write(tmp_path / "nan.nii.gz", data)
    with pytest.raises(VolumeError, match="non-finite") as err:
        load_volume(path, kind=kind)
    assert str(path) in str(err.value) and kind in str(err.value)


def test_singular_affine(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[2, 2] = 0.0
    header = nib.Nifti1Header()
    header.set_sform(affine, code=1)  # written as-is: the image carries no affine of its own
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None, header=header)
    path = tmp_path / "singular.nii.gz"
    nib.save(img, str(path))
    if np.linalg.matrix_rank(nib.load(str(path)).affine[:3, :3]) == 3:
        pytest.skip("nibabel repaired the affine on load")
    with pytest.raises(VolumeError, match="not invertible") as err:
        load_volume(path)
    assert str(path) in str(err.value)


def test_grid_mismatch(tmp_path: Path) -> None:
    image = load_volume(_write(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.int16)))
    same = load_volume(_write(tmp_path / "ok.nii.gz", np.zeros((4, 5, 6), np.uint8)))
    check_same_grid(image, same)
    near = PSR_AFFINE.copy()
    near[0, 3] += 5e-5
    check_same_grid(image, Volume(same.array, near, Path("near.nii.gz")))
    shape_path = _write(tmp_path / "shape.nii.gz", np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(VolumeError, match="shapes") as err:
        check_same_grid(image, load_volume(shape_path))
    assert str(shape_path) in str(err.value) and str(image.path) in str(err.value)
    moved = PSR_AFFINE.copy()
    moved[1, 3] += 0.01
    moved_path = _write(tmp_path / "moved.nii.gz", np.zeros((4, 5, 6), np.uint8), moved)
    with pytest.raises(VolumeError, match="affines differ") as err:
        check_same_grid(image, load_volume(moved_path))
    assert str(moved_path) in str(err.value)


def test_save_mask_round_trip_keeps_grid_and_codes(tmp_path: Path) -> None:
    like = load_volume(FIXTURES / "t2_seg-manual_labeled.nii.gz")
    mask = (like.array > 2).astype(np.int64) * 3
    out = save_mask(tmp_path / "sub" / "pred.nii.gz", mask, like)
    assert out == tmp_path / "sub" / "pred.nii.gz"
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.nii.gz"]  # no temp files
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask.astype(np.uint8))
    np.testing.assert_array_equal(img.affine, like.affine)
    src = nib.load(str(FIXTURES / "t2_seg-manual_labeled.nii.gz")).header
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "srow_x"):
        np.testing.assert_array_equal(img.header[key], src[key])
    # Overwrite in place (atomic replace) and write uncompressed.
    save_mask(out, np.zeros(like.shape, np.uint8), like)
    assert np.asarray(nib.load(str(out)).dataobj).max() == 0
    plain = save_mask(tmp_path / "pred.nii", mask, like)
    np.testing.assert_array_equal(nib.load(str(plain)).affine, like.affine)


def test_save_mask_without_header(tmp_path: Path) -> None:
    like = Volume(np.zeros((4, 5, 6), np.int16), PSR_AFFINE)
    out = save_mask(tmp_path / "m.nii.gz", np.ones((4, 5, 6), bool), like)
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, PSR_AFFINE, atol=1e-6)
    assert int(img.header["sform_code"]) > 0


def test_save_mask_rejects_bad_input(tmp_path: Path) -> None:
    like = Volume(np.zeros((4, 5, 6), np.int16), PSR_AFFINE)
    with pytest.raises(VolumeError, match="shape"):
        save_mask(tmp_path / "m.nii.gz", np.zeros((4, 5, 7), np.uint8), like)
    with pytest.raises(VolumeError, match="uint8"):
        save_mask(tmp_path / "m.nii.gz", np.full((4, 5, 6), 300), like)
    with pytest.raises(VolumeError, match=r"\.nii"):
        save_mask(tmp_path / "m.png", np.zeros((4, 5, 6), np.uint8), like)
    # Probabilities or NaN would be truncated to 0: refused.
    for bad in (np.full((4, 5, 6), 0.6), np.full((4, 5, 6), np.nan)):
        with pytest.raises(VolumeError, match=r"whole numbers in 0\.\.255"):
            save_mask(tmp_path / "m.nii.gz", bad, like)
    with pytest.raises(VolumeError, match="like must be a Volume"):
        save_mask(tmp_path / "m.nii.gz", np.zeros((4, 5, 6), np.uint8), "image.nii.gz")
    assert list(tmp_path.iterdir()) == []
    save_mask(tmp_path / "m.nii.gz", np.ones((4, 5, 6), np.float32), like)  # whole: fine


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    for axis, a in enumerate(np.deg2rad(angles_deg)):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


# torchio 1.1.1 + SimpleITK 2.5.7, `tio.Resample(1.5)(tio.ScalarImage(path)).shape`, for the
# twelve oblique files below: the original's grid sizes (they flip below the exact extent
# where its spacing rounds 1 ulp low, e.g. 63 for 64 · 1.5 mm).
TORCHIO_OBLIQUE_SIZES = [
    (64, 60, 40), (32, 29, 80), (42, 40, 40), (128, 120, 80), (63, 60, 39), (32, 30, 80),
    (42, 39, 40), (128, 120, 80), (64, 60, 40), (32, 30, 79), (42, 39, 39), (128, 120, 79),
]  # fmt: skip


def test_oblique_grid_sizes_match_torchio(tmp_path: Path) -> None:
    """A float32 oblique sform's column lengths miss pixdim by ~1e-8. SimpleITK reads the
    spacing from pixdim, so the resampled sizes floor(n · s / 1.5) must be computed from it,
    not from the stored matrix (which gave other sizes for 11 of these 12 files)."""
    from sammed3d_jax.data.geometry import resampled_grid

    rng = np.random.default_rng(0)
    shape = (64, 60, 40)
    spacings = [(1.5, 1.5, 1.5), (0.75, 0.75, 3.0), (1.0, 1.0, 1.5), (3.0, 3.0, 3.0)]
    for t, expected in enumerate(TORCHIO_OBLIQUE_SIZES):
        spacing = np.array(spacings[t % 4])
        affine = np.eye(4)
        affine[:3, :3] = _rotation(rng.uniform(-20, 20, 3)) * spacing
        affine[:3, 3] = rng.uniform(-100, 100, 3)
        nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), affine), tmp_path / "obl.nii.gz")
        vol = load_volume(tmp_path / "obl.nii.gz")
        stored = nib.load(tmp_path / "obl.nii.gz").affine
        np.testing.assert_allclose(vol.affine, stored, rtol=0, atol=1e-5)  # same geometry
        assert resampled_grid(shape, vol.affine)[0] == expected, (t, spacing)


def test_axis_aligned_affine_is_kept_exactly(tmp_path: Path) -> None:
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])[:, [1, 0, 2, 3]]
    affine[:3, 3] = [10.5, -3.25, 7.0]
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), affine), tmp_path / "a.nii.gz")
    vol = load_volume(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(vol.affine, nib.load(tmp_path / "a.nii.gz").affine)


def test_save_mask_like_a_nifti2_file_writes_nifti1_quietly(tmp_path: Path, caplog) -> None:
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    src = tmp_path / "n2.nii.gz"
    nib.save(nib.Nifti2Image(np.ones((6, 5, 4), np.float32), affine), src)
    like = load_volume(src)
    with caplog.at_level("WARNING"):
        out = save_mask(tmp_path / "mask.nii.gz", np.ones((6, 5, 4), np.uint8), like)
    assert not caplog.records  # nibabel warned about converting the NIfTI-2 header
    img = nib.load(out)
    assert type(img.header) is nib.Nifti1Header
    np.testing.assert_allclose(img.affine, affine)


def test_header_zooms_where_pixdim_and_matrix_disagree(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.uint8), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=0)
    img.header["pixdim"][1:4] = [1.0, 1.0, 1.5]
    nib.save(img, tmp_path / "mismatch.nii.gz")
    vol = load_volume(tmp_path / "mismatch.nii.gz", kind="label")
    np.testing.assert_array_equal(vol.spacing, [2.0, 2.0, 2.0])  # the matrix is kept
    np.testing.assert_array_equal(vol.header_zooms, [1.0, 1.0, 1.5])
    no_header = Volume(np.zeros((2, 2, 2)), affine)
    np.testing.assert_array_equal(no_header.header_zooms, [2.0, 2.0, 2.0])


@pytest.mark.parametrize("units,mm_per_unit", [("meter", 1000.0), ("micron", 1e-3), ("mm", 1.0)])
def test_spatial_units_are_converted_to_mm_and_written_back(
    tmp_path: Path, units: str, mm_per_unit: float
) -> None:
    """A grid stated in metres or microns is read in mm (as ITK does); a mask written on it
    carries the file's own units and numbers again."""
    in_mm = PSR_AFFINE.copy()
    in_file = in_mm.copy()
    in_file[:3, :] /= mm_per_unit
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), in_file)
    img.header.set_xyzt_units(xyz=units)
    nib.save(img, tmp_path / "grid.nii.gz")
    vol = load_volume(tmp_path / "grid.nii.gz")
    np.testing.assert_allclose(vol.affine, in_mm, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(vol.spacing, [1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(vol.header_zooms, [1.0, 1.0, 1.0], rtol=1e-6)
    out = nib.load(str(save_mask(tmp_path / "mask.nii.gz", np.ones(vol.shape, bool), vol)))
    assert out.header.get_xyzt_units()[0] == units
    np.testing.assert_allclose(out.affine, nib.load(str(tmp_path / "grid.nii.gz")).affine)
    np.testing.assert_allclose(load_volume(tmp_path / "mask.nii.gz").affine, vol.affine)
