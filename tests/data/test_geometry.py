"""Geometry layer: unit tests plus bit-exact checks against the original's golden outputs.

The golden checks run on ``tests/fixtures/preprocess`` (sct_t2, always) and, when the shared
folder is present, on every case of ``shared/golden/preprocess`` (marked ``shared``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.data import geometry as geo
from sammed3d_jax.data.nifti import Volume, load_volume, save_mask

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "preprocess"
SHARED = Path(
    os.environ.get("SAMMED3D_SHARED", Path(__file__).resolve().parents[2].parent / "shared")
)
GOLDEN = SHARED / "golden" / "preprocess"
GOLDEN_CASES = ("lung1", "sct_t2", "totalseg_ct_sm")
CROP = 128


# --------------------------------------------------------------------------------------
# Golden harness
# --------------------------------------------------------------------------------------


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class GoldenSource:
    """Where one golden case's files live."""

    name: str
    json_path: Path
    image_path: Path
    label_path: Path
    npz_path: Path | None
    nii_dir: Path


def _shared_source(case: str) -> GoldenSource:
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    return GoldenSource(
        name=case,
        json_path=GOLDEN / f"{case}.json",
        image_path=SHARED / meta["inputs"]["image"],
        label_path=SHARED / meta["inputs"]["label"],
        npz_path=GOLDEN / f"{case}.npz",
        nii_dir=GOLDEN,
    )


FIXTURE_SOURCE = GoldenSource(
    name="sct_t2",
    json_path=FIXTURES / "sct_t2.json",
    image_path=FIXTURES / "t2.nii.gz",
    label_path=FIXTURES / "t2_seg-manual_labeled.nii.gz",
    npz_path=FIXTURES / "sct_t2_reduced.npz",
    nii_dir=FIXTURES,
)


def _synthetic_logits(label_crop: np.ndarray) -> np.ndarray:
    """The golden model stand-in: ``10 · (avg_pool3d(label, 4, 4) − 0.5)`` in float32, 32³."""
    s = label_crop.shape[0] // 4
    pooled = label_crop.astype(np.float32).reshape(s, 4, s, 4, s, 4).sum(axis=(1, 3, 5))
    pooled = pooled / np.float32(64)
    return (np.float32(10) * (pooled - np.float32(0.5))).astype(np.float32)


def _upsample_x4_like_torch(low: np.ndarray) -> np.ndarray:
    """``F.interpolate(trilinear, align_corners=False)`` ×4. Exact here: every operand is a
    small multiple of a power of two, so float64 gives torch's float32 values."""
    n = low.shape[0]
    o = np.arange(4 * n, dtype=np.float64)
    src = np.maximum(0.25 * (o + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n - 1)
    lam = np.clip(src - i0, 0.0, 1.0)
    i1 = i0 + (i0 < n - 1)
    x = low.astype(np.float64)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = -1
        w1 = lam.reshape(shape)
        x = np.take(x, i0, axis=axis) * (1.0 - w1) + np.take(x, i1, axis=axis) * w1
    return x


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / denom) if denom else float("nan")


@dataclasses.dataclass
class CaseRun:
    source: GoldenSource
    meta: dict
    image: Volume
    label: Volume
    npz: dict[str, np.ndarray]
    results: dict[int, geo.Preprocessed]
    logits: dict[int, np.ndarray]
    upsampled: dict[int, np.ndarray]
    pred: dict[int, np.ndarray]
    paste_perfect: dict[int, np.ndarray]
    paste_synthetic: dict[int, np.ndarray]


@functools.cache
def _run(source: GoldenSource) -> CaseRun:
    meta = json.loads(source.json_path.read_text())
    image = load_volume(source.image_path)
    label = load_volume(source.label_path, kind="label")
    npz = {}
    if source.npz_path is not None and source.npz_path.exists():
        with np.load(source.npz_path) as z:
            npz = {k: z[k] for k in z.files}
    classes = [int(c) for c in meta["per_class"]]
    results = geo.preprocess_case(image, label, classes)
    logits, upsampled, pred, perfect, synthetic = {}, {}, {}, {}, {}
    for cid, p in results.items():
        logits[cid] = _synthetic_logits(p.roi_label)
        upsampled[cid] = _upsample_x4_like_torch(logits[cid])
        pred[cid] = (upsampled[cid] > 0).astype(np.uint8)
        perfect[cid] = geo.paste_back(p.roi_label, p.roi_affine, image.shape, image.affine)
        synthetic[cid] = geo.paste_back(pred[cid], p.roi_affine, image.shape, image.affine)
    return CaseRun(
        source, meta, image, label, npz, results, logits, upsampled, pred, perfect, synthetic
    )


def _load_nii(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def check_class(run: CaseRun, cid: int) -> None:
    """Every per-class golden check: geometry, crops, z-norm, synthetic, paste-back."""
    pc = run.meta["per_class"][str(cid)]
    p = run.results[cid]
    atol = 1e-9

    # Original grid.
    assert list(p.original_shape) == pc["meta_info"]["original_subject_spatial_shape"]
    np.testing.assert_allclose(
        p.original_affine, pc["meta_info"]["original_subject_affine"], rtol=0, atol=atol
    )
    # Resampled and canonical grids.
    for key, shape, affine in (
        ("resampled", p.resampled_shape, p.resampled_affine),
        ("canonical", p.canonical_shape, p.canonical_affine),
    ):
        for kind in ("image", "label"):
            ref = pc[key][kind]
            assert list(shape) == ref["spatial_shape"], (key, kind)
            np.testing.assert_allclose(affine, ref["affine_ras"], rtol=0, atol=atol)
    want_map = tuple(geo.AxisMap(**m) for m in pc["canonical"]["axis_map_from_resampled"])
    assert p.axis_map == want_map
    # Bounding box, crop box, applied pad/crop, ROI affine.
    applied = pc["crop_or_pad_applied"]
    assert p.bbox is not None
    assert p.bbox[0].tolist() == applied["label_bbox"]["min"]
    assert p.bbox[1].tolist() == applied["label_bbox"]["max_exclusive"]
    box = pc["crop_box_in_canonical_grid"]
    assert p.start.tolist() == box["start"]
    shape = np.array(p.canonical_shape)
    stop = p.start + CROP
    pad = np.stack([np.maximum(-p.start, 0), np.maximum(stop - shape, 0)], 1).ravel()
    crop = np.stack([np.maximum(p.start, 0), np.maximum(shape - stop, 0)], 1).ravel()
    assert (pad.tolist() if pad.any() else None) == applied["padding"]
    assert (crop.tolist() if crop.any() else None) == applied["cropping"]
    np.testing.assert_allclose(p.roi_affine, pc["roi"]["affine_ras"], rtol=0, atol=atol)
    np.testing.assert_allclose(
        p.roi_affine, pc["meta_info"]["roi_subject_affine"], rtol=0, atol=atol
    )

    # Crops: exact.
    assert p.roi_raw.dtype == np.dtype(pc["roi_raw"]["dtype"])
    assert _sha(p.roi_raw) == pc["roi_raw"]["sha256"]
    assert _sha(p.roi_label) == pc["roi_label"]["sha256_uint8"]
    assert int(p.roi_label.sum()) == pc["roi_label"]["voxels"]
    raw_key, label_key = f"c{cid}_image_raw", f"c{cid}_label"
    if raw_key in run.npz:
        np.testing.assert_array_equal(p.roi_raw, run.npz[raw_key])
    if label_key in run.npz:
        np.testing.assert_array_equal(p.roi_label, run.npz[label_key])
    click = tuple(pc["click"]["point_A0A1A2"])
    assert p.roi_label[click] == 1

    # Z-normalisation: torch's float32 statistics are reproduced exactly.
    zn = pc["znorm"]
    assert p.n_mask_voxels == zn["n_mask_voxels"]
    np.testing.assert_allclose(p.mean, zn["mean_float32"], rtol=1e-6)
    np.testing.assert_allclose(p.std, zn["std_unbiased_float32"], rtol=1e-6)
    assert np.float32(p.mean) == np.float32(zn["mean_float32"])
    assert np.float32(p.std) == np.float32(zn["std_unbiased_float32"])
    assert p.roi_image.dtype == np.float32
    assert _sha(p.roi_image) == pc["roi_image_float32"]["sha256"]
    if raw_key in run.npz:
        raw = run.npz[raw_key].astype(np.float32)
        rebuilt = (raw - np.float32(zn["mean_float32"])) / np.float32(zn["std_unbiased_float32"])
        np.testing.assert_array_equal(p.roi_image, rebuilt)
    f16_key = f"c{cid}_image_f16"
    if f16_key in run.npz:
        np.testing.assert_array_equal(p.roi_image.astype(np.float16), run.npz[f16_key])

    # Synthetic prediction from the label crop.
    syn = pc["synthetic"]
    assert _sha(run.logits[cid]) == syn["lowres_logits_sha256"]
    assert int(np.count_nonzero(run.upsampled[cid] == 0)) == syn["upsampled_exact_zero_voxels"]
    assert _sha(run.pred[cid]) == syn["roi_pred_sha256"]
    if f"c{cid}_roi_pred_synthetic" in run.npz:
        np.testing.assert_array_equal(run.pred[cid], run.npz[f"c{cid}_roi_pred_synthetic"])

    # Paste-back onto the original grid: exact.
    original = np.asarray(run.label.array) == cid
    for key, pasted in (
        ("paste_perfect", run.paste_perfect[cid]),
        ("paste_synthetic", run.paste_synthetic[cid]),
    ):
        ref = pc[key]
        assert pasted.dtype == np.uint8 and pasted.shape == run.image.shape
        assert int(pasted.sum()) == ref["voxels"], key
        assert _sha(pasted) == ref["sha256_uint8_nibabel_ijk"], key
        assert _sha(pasted.transpose(2, 1, 0)) == ref["sha256_uint8_ZYX"], key
        assert _dice(pasted, original) == pytest.approx(ref["dice_vs_original_label"], abs=1e-12)
        kind = key.split("_")[1]
        nii = run.source.nii_dir / f"{run.source.name}_c{cid}_paste_{kind}.nii.gz"
        if nii.exists():
            np.testing.assert_array_equal(pasted, _load_nii(nii))
    if label_key in run.npz:  # the golden crop itself pastes to the same mask
        again = geo.paste_back(run.npz[label_key], p.roi_affine, run.image.shape, run.image.affine)
        np.testing.assert_array_equal(again, run.paste_perfect[cid])


def check_merged(run: CaseRun) -> None:
    merged = run.meta["merged"]
    perfect = geo.merge_class_masks(run.paste_perfect)
    synthetic = geo.merge_class_masks(run.paste_synthetic)
    assert _sha(perfect.transpose(2, 1, 0)) == merged["merged_perfect_sha256_uint8_ZYX"]
    assert _sha(synthetic.transpose(2, 1, 0)) == merged["entrypoint_sha256_uint8_ZYX"]
    np.testing.assert_array_equal(
        perfect, _load_nii(run.source.nii_dir / merged["merged_perfect_file"])
    )
    np.testing.assert_array_equal(
        synthetic, _load_nii(run.source.nii_dir / merged["entrypoint_synthetic_file"])
    )


# --------------------------------------------------------------------------------------
# Golden checks: offline fixture (always)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cid", [2, 3, 4, 5])
def test_fixture_sct_t2_class(cid: int) -> None:
    check_class(_run(FIXTURE_SOURCE), cid)


def test_fixture_sct_t2_merged() -> None:
    check_merged(_run(FIXTURE_SOURCE))


def test_fixture_save_mask_matches_original_writer(tmp_path: Path) -> None:
    run = _run(FIXTURE_SOURCE)
    merged = geo.merge_class_masks(run.paste_perfect)
    out = save_mask(tmp_path / "merged.nii.gz", merged, like=run.label)
    golden = nib.load(str(FIXTURES / "sct_t2_merged_perfect.nii.gz"))
    written = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(golden.dataobj))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, golden.affine)
    np.testing.assert_array_equal(written.affine, run.label.affine)


def test_fixture_center_crop_reproduces_label_crop() -> None:
    run = _run(FIXTURE_SOURCE)
    p = run.results[3]
    center = (p.bbox[0] + p.bbox[1] - 1) / 2  # midpoint of the first and last label voxel
    by_point = geo.preprocess_for_class(run.image, run.label, 3, center=center)
    np.testing.assert_array_equal(by_point.start, p.start)
    np.testing.assert_array_equal(by_point.roi_label, p.roi_label)
    label_free = geo.preprocess_for_class(run.image, None, None, center=center)
    assert label_free.roi_label is None and label_free.bbox is None
    np.testing.assert_array_equal(label_free.roi_image, p.roi_image)
    np.testing.assert_array_equal(label_free.roi_affine, p.roi_affine)


def test_fixture_coordinate_helpers_agree_with_paste_back() -> None:
    run = _run(FIXTURE_SOURCE)
    p = run.results[2]
    ijk = np.argwhere(run.paste_perfect[2] == 1)
    roi = geo.original_voxel_to_roi(ijk, p.original_affine, p.roi_affine)
    frac = np.abs(roi - np.floor(roi) - 0.5)
    clear = (frac > 1e-6).all(axis=1)  # leave out exact half-voxel ties
    assert clear.sum() >= 100  # 1 mm -> 1.5 mm ties sit on every third plane of each axis
    near = np.floor(roi[clear] + 0.5).astype(int)
    assert (p.roi_label[tuple(near.T)] == 1).all()
    back = geo.roi_to_original_voxel(roi, p.roi_affine, p.original_affine)
    np.testing.assert_allclose(back, ijk, atol=1e-9)
    # The ROI origin is canonical voxel `start`; through the axis map it is a resampled index.
    origin_mm = geo.voxel_to_world(p.roi_affine, np.zeros(3))
    np.testing.assert_allclose(
        geo.world_to_voxel(p.canonical_affine, origin_mm), p.start, atol=1e-9
    )
    res_idx = geo.canonical_to_source_index(p.start.astype(float), p.axis_map)
    np.testing.assert_allclose(
        geo.voxel_to_world(p.resampled_affine, res_idx), origin_mm, atol=1e-9
    )


# --------------------------------------------------------------------------------------
# Golden checks: every case and class of shared/golden/preprocess
# --------------------------------------------------------------------------------------


def _shared_params() -> list:
    if not GOLDEN.is_dir():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"{GOLDEN} absent"))]
    params = []
    for case in GOLDEN_CASES:
        meta = json.loads((GOLDEN / f"{case}.json").read_text())
        params += [pytest.param(case, int(c), id=f"{case}-c{c}") for c in meta["per_class"]]
    return params


@pytest.mark.shared
@pytest.mark.parametrize(("case", "cid"), _shared_params())
def test_shared_golden_class(case: str, cid: int) -> None:
    check_class(_run(_shared_source(case)), cid)


@pytest.mark.shared
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_shared_golden_merged(case: str) -> None:
    if not GOLDEN.is_dir():
        pytest.skip(f"{GOLDEN} absent")
    check_merged(_run(_shared_source(case)))


@pytest.mark.shared
def test_shared_znorm_float32_stats_all_classes() -> None:
    """torch's float32 mean (AVX2 cascade sum, 2 threads) and std match in all 46 runs."""
    if not GOLDEN.is_dir():
        pytest.skip(f"{GOLDEN} absent")
    n = 0
    for case in GOLDEN_CASES:
        run = _run(_shared_source(case))
        for cid, p in run.results.items():
            zn = run.meta["per_class"][str(cid)]["znorm"]
            assert (p.mean, p.std) == (zn["mean_float32"], zn["std_unbiased_float32"])
            n += 1
    assert n == 46


# --------------------------------------------------------------------------------------
# Unit tests on synthetic grids
# --------------------------------------------------------------------------------------


def _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), perm=(0, 1, 2), flips=(1, 1, 1)):
    a = np.zeros((4, 4))
    for col, row in enumerate(perm):
        a[row, col] = spacing[col] * flips[col]
    a[:3, 3] = origin
    a[3, 3] = 1.0
    return a


def test_resampled_grid_rule() -> None:
    aff = _affine((0.7, 3.0, 2.0), (10.0, -5.0, 3.0), flips=(-1, -1, 1))
    shape, new = geo.resampled_grid((100, 7, 1), aff)
    assert shape == (46, 14, 1)  # floor(70/1.5), floor(21/1.5), size-1 axis kept
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), 1.5)
    np.testing.assert_allclose(np.sign(new[:3, :3]), np.sign(aff[:3, :3]))
    old_mid = aff @ np.r_[(np.array([100, 7, 1]) - 1) / 2, 1]
    new_mid = new @ np.r_[(np.array(shape) - 1) / 2, 1]
    np.testing.assert_allclose(new_mid, old_mid, atol=1e-9)


def test_resample_identity_grid_nearest_and_float_linear() -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(9, 8, 7))
    aff = _affine((1.5, 1.5, 1.5), (3.0, 2.0, 1.0), perm=(1, 2, 0), flips=(1, -1, 1))
    out, new = geo.resample_to_spacing(arr, aff, order="linear")
    np.testing.assert_allclose(new, aff, atol=1e-12)
    np.testing.assert_allclose(out, arr, atol=1e-12)
    lab = rng.integers(0, 5, size=(9, 8, 7)).astype(np.uint8)
    out, _ = geo.resample_to_spacing(lab, aff, order="nearest")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, lab)


def test_resample_linear_ramp_and_edges() -> None:
    # A ramp along axis 0 is reproduced by linear interpolation, clamped to the end voxels
    # within half a voxel of the edge and 0 beyond.
    n = 6
    arr = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], (n, 3, 3)).copy()
    src = _affine((1.0, 1.0, 1.0))
    dst = _affine((0.125, 1.0, 1.0), (-0.875, 1.0, 1.0))
    m0 = 58  # positions -0.875 ... 6.25
    out = geo.resample_to_grid(arr, src, (m0, 1, 1), dst, "linear")[:, 0, 0]
    pos = -0.875 + 0.125 * np.arange(m0)
    checked = 0
    for x, v in zip(pos, out):
        if min(abs(x + 0.5), abs(x - (n - 0.5))) < 1e-6:
            continue  # exactly on the buffer edge: decided by rounding noise, as in ITK
        if x < -0.5 or x >= n - 0.5:
            assert v == 0.0, x
        else:
            assert v == pytest.approx(min(max(x, 0.0), n - 1), abs=1e-9), x
        checked += 1
    assert checked == m0 - 2


def test_resample_integer_truncates_toward_zero() -> None:
    arr = np.zeros((2, 1, 1), dtype=np.int16)
    arr[:, 0, 0] = [-10, -20]
    src = _affine()
    dst = _affine(origin=(0.27, 0.0, 0.0))
    as_float = geo.resample_to_grid(arr.astype(np.float64), src, (1, 1, 1), dst, "linear")
    assert as_float[0, 0, 0] == pytest.approx(-12.7)
    as_int = geo.resample_to_grid(arr, src, (1, 1, 1), dst, "linear")
    assert as_int.dtype == np.int16 and as_int[0, 0, 0] == -12
    arr[:, 0, 0] = [10, 20]
    assert geo.resample_to_grid(arr, src, (1, 1, 1), dst, "linear")[0, 0, 0] == 12


def test_cast_like_itk_clamps() -> None:
    v = np.array([-300.7, -1.5, 1.5, 254.9, 300.2])
    np.testing.assert_array_equal(geo._cast_like_itk(v, np.dtype(np.uint8)), [0, 0, 1, 254, 255])
    np.testing.assert_array_equal(geo._cast_like_itk(v, np.dtype(np.int8)), [-128, -1, 1, 127, 127])


def test_resample_nearest_rounds_half_up_and_zero_outside() -> None:
    arr = np.arange(4, dtype=np.uint8).reshape(4, 1, 1) + 1
    src = _affine()
    dst = _affine((0.5, 1.0, 1.0), (-0.5, 0.0, 0.0))  # x = -0.5, 0, 0.5, ..., 3.5, 4
    out = geo.resample_to_grid(arr, src, (10, 1, 1), dst, "nearest")[:, 0, 0]
    np.testing.assert_array_equal(out, [1, 1, 2, 2, 3, 3, 4, 4, 0, 0])


def test_resample_large_ct_shape_dtype_range() -> None:
    arr = np.random.default_rng(1).integers(-1024, 2000, size=(256, 256, 48), dtype=np.int16)
    aff = _affine((0.7, 0.7, 5.0), flips=(-1, -1, 1))
    out, _ = geo.resample_to_spacing(arr, aff)
    assert out.shape == (119, 119, 160) and out.dtype == np.int16
    assert out.min() >= -1024 and out.max() < 2000


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0), (0, 2, 1)])
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_to_canonical_matches_nibabel(perm, flips) -> None:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    aff = _affine((1.0, 2.0, 3.0), (5.0, 6.0, 7.0), perm, flips)
    can, can_aff, axis_map = geo.to_canonical(arr, aff)
    ref = nib.as_closest_canonical(nib.Nifti1Image(arr, aff))
    np.testing.assert_array_equal(can, np.asarray(ref.dataobj))
    np.testing.assert_array_equal(can_aff, ref.affine)
    assert nib.aff2axcodes(can_aff) == ("R", "A", "S")
    for a, m in enumerate(axis_map):
        assert can.shape[a] == arr.shape[m.source_axis] == m.source_len
    # Every canonical voxel reads the source voxel the axis map names.
    idx = np.argwhere(np.ones(can.shape, bool))
    src_idx = geo.canonical_to_source_index(idx, axis_map).astype(int)
    np.testing.assert_array_equal(can[tuple(idx.T)], arr[tuple(src_idx.T)])


def _torchio_mask_start(lo: int, hi: int, target: int) -> int:
    """torchio's CropOrPad(mask_name=...) rule written out as in its source description."""
    center = (lo + hi) / 2
    if (target % 2 == 0) ^ (center % 1 == 0):
        center -= 0.5
    return int(center - target / 2)


@pytest.mark.parametrize("target", [128, 127, 8, 9])
def test_crop_start_from_mask_matches_torchio_rule(target: int) -> None:
    for lo in range(0, 7):
        for hi in range(lo + 1, lo + 9):
            mask = np.zeros((20, 3, 3), np.uint8)
            mask[lo:hi, 1, 1] = 1
            start = geo.crop_start_from_mask(mask, target)
            assert start[0] == _torchio_mask_start(lo, hi, target), (lo, hi)
            assert start[1] == _torchio_mask_start(1, 2, target)


def test_crop_or_pad_around_mask_values_and_empty_mask() -> None:
    arr = np.arange(1, 33 * 140 * 128 + 1, dtype=np.int32).reshape(33, 140, 128)
    mask = np.zeros(arr.shape, np.uint8)
    mask[3:5, 100:110, 60:61] = 1
    crop, start = geo.crop_or_pad_around_mask(arr, mask)
    assert crop.shape == (128, 128, 128)
    np.testing.assert_array_equal(start, [4 - 64, 105 - 64, 60 - 64])
    # Voxel (a, b, c) of the crop is voxel start + (a, b, c) of the array, 0 outside.
    for a, b, c in [(0, 0, 0), (60, 0, 64), (64, 64, 64), (127, 127, 127), (92, 98, 3)]:
        src = start + np.array([a, b, c])
        inside = all(0 <= s < n for s, n in zip(src, arr.shape))
        assert crop[a, b, c] == (arr[tuple(src)] if inside else 0)
    # Empty mask: centred box, the low side gets ceil(diff / 2).
    crop, start = geo.crop_or_pad_around_mask(arr, np.zeros_like(mask))
    np.testing.assert_array_equal(start, [-48, 6, 0])  # pad 95 -> 48/47, crop 12 -> 6/6
    np.testing.assert_array_equal(geo.crop_start_centered((33, 131, 128)), [-48, 2, 0])
    assert crop[48, 0, 0] == arr[0, 6, 0] and crop[47].max() == 0


def test_roi_affine_moves_origin_to_start() -> None:
    can = _affine((1.5, 1.5, 1.5), (-30.2, 11.0, 4.5))
    start = np.array([-48, 12, -3])
    roi = geo.roi_affine(can, start)
    np.testing.assert_array_equal(roi[:3, :3], can[:3, :3])
    np.testing.assert_allclose(roi @ [0, 0, 0, 1], can @ np.r_[start, 1], atol=1e-12)


def test_torch_float32_sum_close_to_exact() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 7, 8, 33, 1000, 32767, 70001, 600000):
        v = rng.uniform(0, 1000, size=n).astype(np.float32)
        exact = float(np.sum(v.astype(np.float64)))
        for threads in (1, 2, 4):
            got = float(geo.torch_float32_sum(v, threads=threads))
            assert got == pytest.approx(exact, rel=2e-6), (n, threads)


def test_znormalize_statistics_and_errors() -> None:
    rng = np.random.default_rng(4)
    roi = rng.integers(-500, 800, size=(16, 16, 16)).astype(np.int16)
    out, mean, std = geo.znormalize(roi)
    pos = roi[roi > 0].astype(np.float64)
    assert mean == pytest.approx(pos.mean(), rel=1e-6)
    assert std == pytest.approx(pos.std(ddof=1), rel=1e-6)
    assert out.dtype == np.float32
    expect = (roi.astype(np.float32) - np.float32(mean)) / np.float32(std)
    np.testing.assert_array_equal(out, expect)  # non-positive voxels are normalised too
    with pytest.raises(ValueError, match="at least 2 voxels"):
        geo.znormalize(np.zeros((4, 4, 4), np.int16))
    one = np.zeros((4, 4, 4), np.int16)
    one[1, 1, 1] = 5
    with pytest.raises(ValueError, match="at least 2 voxels"):
        geo.znormalize(one)
    const = np.full((4, 4, 4), 7, np.int16)
    with pytest.raises(ValueError, match="std"):
        geo.znormalize(const)
    huge = rng.random((4, 4, 4)) * 1e300 + 1.0  # finite in float64, not in float32
    with pytest.raises(ValueError, match="overflow float32"):
        geo.znormalize(huge)


def test_paste_back_round_trip_on_synthetic_volume() -> None:
    # A 1 mm LPS volume: preprocess, then paste the label crop back onto the original grid.
    shape = (70, 60, 50)
    aff = _affine((1.0, 1.0, 1.0), (35.0, 30.0, -20.0), flips=(-1, -1, 1))
    rng = np.random.default_rng(5)
    img = rng.integers(1, 1000, size=shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[20:41, 15:36, 10:31] = 1  # 21³ mm cube, far from ties after 1 -> 1.5 -> 1 mm
    image, label = Volume(img, aff), Volume(lab, aff)
    p = geo.preprocess_for_class(image, label, 1)
    assert p.roi_image.shape == (128, 128, 128) and p.roi_label.dtype == np.uint8
    pasted = geo.paste_back(p.roi_label, p.roi_affine, shape, aff)
    assert pasted.dtype == np.uint8 and pasted.shape == shape
    assert _dice(pasted, lab) > 0.9
    with pytest.raises(ValueError, match="class_id"):
        geo.preprocess_for_class(image, label, None)


def test_merge_class_masks_later_ids_win() -> None:
    a = np.zeros((3, 3, 3), np.uint8)
    b = np.zeros((3, 3, 3), np.uint8)
    a[0:2] = 1
    b[1:3] = 1
    merged = geo.merge_class_masks({7: b, 2: a})
    assert merged[0, 0, 0] == 2 and merged[1, 0, 0] == 7 and merged[2, 0, 0] == 7
    with pytest.raises(ValueError):
        geo.merge_class_masks({300: a})


# --------------------------------------------------------------------------------------
# Box-restricted resampling (paste-back fast path) == full-grid reference, bit for bit
# --------------------------------------------------------------------------------------


def _assert_fast_equals_reference(mask, roi_aff, shape, aff) -> np.ndarray:
    fast = geo.paste_back(mask, roi_aff, shape, aff)
    ref = geo._paste_back_reference(mask, roi_aff, shape, aff)
    assert fast.dtype == ref.dtype == np.uint8 and fast.shape == ref.shape == tuple(shape)
    np.testing.assert_array_equal(fast, ref)
    return fast


def _check_golden_paste_reference(run: CaseRun) -> None:
    ones = np.ones((CROP, CROP, CROP), np.uint8)  # the whole ROI box, edge ties included
    for cid, p in run.results.items():
        for mask in (p.roi_label, run.pred[cid], ones):
            _assert_fast_equals_reference(mask, p.roi_affine, run.image.shape, run.image.affine)


def test_fixture_paste_back_fast_equals_reference() -> None:
    _check_golden_paste_reference(_run(FIXTURE_SOURCE))


@pytest.mark.shared
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_shared_paste_back_fast_equals_reference(case: str) -> None:
    if not GOLDEN.is_dir():
        pytest.skip(f"{GOLDEN} absent")
    _check_golden_paste_reference(_run(_shared_source(case)))


# Orientation codes as (perm, flips) for _affine: file axis c runs along world row perm[c].
_ORIENTATIONS = {
    "LPS": ((0, 1, 2), (-1, -1, 1)),
    "PSR": ((1, 2, 0), (-1, 1, 1)),
    "RAS": ((0, 1, 2), (1, 1, 1)),
    "ASL": ((1, 2, 0), (1, 1, -1)),
}


def _pipeline_roi_affine(shape, aff, start) -> tuple[np.ndarray, tuple]:
    """ROI affine as the pipeline builds it: 1.5 mm centred grid, RAS+ reorientation, crop."""
    res_shape, res_aff = geo.resampled_grid(shape, aff)
    can, can_aff, _ = geo.to_canonical(np.zeros(res_shape, np.uint8), res_aff)
    return geo.roi_affine(can_aff, start), can.shape


def _test_masks(rng: np.random.Generator) -> list[np.ndarray]:
    ones = np.ones((CROP, CROP, CROP), np.uint8)
    noise = (rng.random((CROP, CROP, CROP)) < 0.3).astype(np.uint8)
    blob = np.zeros((CROP, CROP, CROP), np.uint8)
    lo = rng.integers(0, CROP - 20, size=3)
    hi = lo + rng.integers(1, 20, size=3)
    blob[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    corners = np.zeros((CROP, CROP, CROP), np.uint8)  # single voxels on the ROI's edges
    corners[0, 0, 0] = corners[-1, -1, -1] = corners[0, -1, 64] = corners[127, 3, 0] = 1
    return [ones, noise, blob, corners]


@pytest.mark.parametrize("code", list(_ORIENTATIONS))
@pytest.mark.parametrize(
    "spacing",
    [(1.0, 1.0, 1.0), (0.7, 0.7, 5.0), (3.0, 3.0, 3.0), (0.57, 0.83, 2.5), (1.2, 0.9, 1.5)],
)
def test_paste_back_fast_equals_reference_random_grids(code: str, spacing) -> None:
    perm, flips = _ORIENTATIONS[code]
    seed = zlib.crc32(repr((code, spacing)).encode())
    rng = np.random.default_rng(seed)
    # Original grid: about 60-160 mm per axis; origin on a random sub-voxel offset.
    shape = tuple(int(v) for v in rng.integers(60, 160, size=3) / np.array(spacing))
    shape = tuple(max(8, min(v, 200)) for v in shape)
    origin = rng.uniform(-200.0, 200.0, size=3).round(rng.integers(0, 4))
    aff = _affine(spacing, origin, perm, flips)
    roi_aff, can_shape = _pipeline_roi_affine(shape, aff, np.zeros(3, np.int64))
    can_shape = np.array(can_shape)
    starts = [
        (can_shape - CROP) // 2,  # centred (pads where the volume is smaller than 128)
        np.array([-90, 5, -60]),  # partly outside, low side
        can_shape - 40,  # partly outside, high side
        rng.integers(-100, can_shape.max(), size=3),
    ]
    masks = _test_masks(rng)
    for start in starts:
        roi_aff, _ = _pipeline_roi_affine(shape, aff, start)
        for mask in masks:
            _assert_fast_equals_reference(mask, roi_aff, shape, aff)


def test_paste_back_fast_equals_reference_random_affines() -> None:
    # ROI and original grids with unrelated spacings, origins and axis permutations/flips.
    rng = np.random.default_rng(11)
    perms = [(0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2), (2, 1, 0)]
    for trial in range(24):
        shape = tuple(int(v) for v in rng.integers(20, 110, size=3))
        spacing = rng.uniform(0.4, 4.0, size=3)
        flips = rng.choice([-1, 1], size=3)
        aff = _affine(spacing, rng.uniform(-150, 150, 3), perms[trial % 6], flips)
        roi_spacing = rng.choice([1.5, rng.uniform(0.5, 3.0)], size=3)
        roi_flips = rng.choice([-1, 1], size=3)
        # Place the ROI centre somewhere around the original grid (inside or partly out).
        center_mm = geo.voxel_to_world(aff, rng.uniform(-0.5, 1.5, 3) * np.array(shape))
        roi_aff = _affine(roi_spacing, (0, 0, 0), perms[rng.integers(6)], roi_flips)
        roi_aff[:3, 3] = center_mm - roi_aff[:3, :3] @ np.full(3, 63.5)
        for mask in _test_masks(rng):
            _assert_fast_equals_reference(mask, roi_aff, shape, aff)


def test_paste_back_fast_equals_reference_oblique() -> None:
    # Not produced by the pipeline, but the box stays conservative for rotated grids.
    rng = np.random.default_rng(12)
    shape = (90, 80, 70)
    aff = _affine((0.9, 1.1, 1.3), (-40.0, -45.0, -50.0))
    angle = np.deg2rad(17.0)
    rot = np.array(
        [
            [np.cos(angle), -np.sin(angle), 0.0],
            [np.sin(angle) * np.cos(0.3), np.cos(angle) * np.cos(0.3), -np.sin(0.3)],
            [np.sin(angle) * np.sin(0.3), np.cos(angle) * np.sin(0.3), np.cos(0.3)],
        ]
    )
    roi_aff = np.eye(4)
    roi_aff[:3, :3] = rot * 0.6
    roi_aff[:3, 3] = (-20.0, -25.0, -30.0)
    for mask in _test_masks(rng):
        _assert_fast_equals_reference(mask, roi_aff, shape, aff)


def test_paste_back_uses_the_separable_path_for_pipeline_grids(monkeypatch) -> None:
    # Permuted/flipped grids take the 1-D path (the tests above prove it bit-identical);
    # oblique ones fall back to the general scan-line computation.
    taken = []
    original = geo._nearest_separable

    def spy(*args):
        out = original(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(geo, "_nearest_separable", spy)
    shape = (90, 80, 70)
    perm, flips = _ORIENTATIONS["PSR"]
    aff = _affine((0.8, 1.2, 2.0), (10.0, -20.0, 30.0), perm, flips)
    roi_aff, can_shape = _pipeline_roi_affine(shape, aff, np.zeros(3, np.int64))
    roi_aff, _ = _pipeline_roi_affine(shape, aff, (np.array(can_shape) - CROP) // 2)
    _assert_fast_equals_reference(np.ones((CROP,) * 3, np.uint8), roi_aff, shape, aff)
    assert taken == [True]
    oblique = roi_aff.copy()
    oblique[:3, :3] = oblique[:3, :3] @ np.array(
        [[1.0, 0.0, 0.0], [0.0, np.cos(0.2), -np.sin(0.2)], [0.0, np.sin(0.2), np.cos(0.2)]]
    )
    _assert_fast_equals_reference(np.ones((CROP,) * 3, np.uint8), oblique, shape, aff)
    assert taken == [True, False]


def test_paste_back_roi_entirely_outside_is_zero_and_skipped() -> None:
    shape = (120, 110, 40)
    aff = _affine((0.7, 0.7, 5.0), (40.0, 38.0, -100.0), flips=(-1, -1, 1))
    roi_aff, can_shape = _pipeline_roi_affine(shape, aff, np.zeros(3, np.int64))
    ones = np.ones((CROP, CROP, CROP), np.uint8)
    for start in ([200, 0, 0], [0, -300, 0], [0, 0, np.array(can_shape)[2] + 20], [-140] * 3):
        roi_aff, _ = _pipeline_roi_affine(shape, aff, np.array(start))
        out = _assert_fast_equals_reference(ones, roi_aff, shape, aff)
        assert out.dtype == np.uint8 and not out.any()
        box = geo._candidate_box(
            geo._itk_grid(roi_aff), geo._itk_grid(aff), (0, 0, 0), (CROP,) * 3, shape
        )
        assert box is None, start
    # An empty mask needs no resampling at all.
    inside, _ = _pipeline_roi_affine(shape, aff, np.array([-10, -10, -50]))
    assert not geo.paste_back(np.zeros_like(ones), inside, shape, aff).any()


def test_resample_to_grid_box_restriction_linear_and_nearest() -> None:
    # The box restriction is shared by both orders of resample_to_grid.
    rng = np.random.default_rng(13)
    src = rng.normal(100.0, 50.0, size=(40, 30, 20))
    src_aff = _affine((1.5, 1.5, 1.5), (-10.3, 4.2, -7.0), (1, 2, 0), (-1, 1, 1))
    dst_aff = _affine((0.7, 0.9, 2.0), (-60.0, -25.0, -40.0), flips=(1, -1, 1))
    dst_aff[:3, 3] = (-40.0, 40.0, -40.0)
    shape = (160, 120, 60)
    for arr in (src, src.astype(np.int16), (src > 120).astype(np.uint8)):
        for order in ("linear", "nearest"):
            fast = geo.resample_to_grid(arr, src_aff, shape, dst_aff, order)
            ref = geo._resample_to_grid_reference(arr, src_aff, shape, dst_aff, order)
            assert fast.dtype == ref.dtype == arr.dtype
            np.testing.assert_array_equal(fast, ref)
            assert 0 < np.count_nonzero(fast) < fast.size
    # The candidate box is much smaller than the output grid here.
    box = geo._candidate_box(
        geo._itk_grid(src_aff), geo._itk_grid(dst_aff), (0, 0, 0), src.shape, shape
    )
    assert box is not None
    assert np.prod([b - a for a, b in box]) < 0.5 * np.prod(shape)


def test_paste_back_speedup_large_ct(capsys) -> None:
    """512×512×300 CT grid: timing of the fast path vs the full grid (printed, not asserted)."""
    import time

    shape = (512, 512, 300)
    aff = _affine((0.7, 0.7, 1.0), (179.0, 179.0, -150.0), flips=(-1, -1, 1))
    rng = np.random.default_rng(14)
    roi_aff, _ = _pipeline_roi_affine(shape, aff, np.array([60, 70, 40]))
    dense = (rng.random((CROP, CROP, CROP)) < 0.5).astype(np.uint8)
    blob = np.zeros((CROP, CROP, CROP), np.uint8)
    blob[50:80, 40:90, 55:70] = 1
    lines = []
    for name, mask in (("dense ROI", dense), ("30x50x15 blob", blob)):
        t0 = time.perf_counter()
        fast = geo.paste_back(mask, roi_aff, shape, aff)
        t1 = time.perf_counter()
        ref = geo._paste_back_reference(mask, roi_aff, shape, aff)
        t2 = time.perf_counter()
        np.testing.assert_array_equal(fast, ref)
        lines.append(
            f"paste_back {shape} {name}: fast {1e3 * (t1 - t0):.1f} ms, "
            f"full grid {1e3 * (t2 - t1):.1f} ms, speed-up {(t2 - t1) / (t1 - t0):.1f}x"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
