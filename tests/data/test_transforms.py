"""Training transforms: geometry identical to inference preprocessing, flips, CT clamp."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.data import geometry as geo
from sammed3d_jax.data import transforms as T
from sammed3d_jax.data.nifti import load_volume

SHARED = Path(
    os.environ.get("SAMMED3D_SHARED", Path(__file__).resolve().parents[2].parent / "shared")
)
DATA = SHARED / "data"

# Non-RAS storage (axes permuted and flipped), anisotropic spacing, off-grid origin.
AFFINE = np.array(
    [
        [0.0, 0.0, -3.0, 41.3],
        [-2.0, 0.0, 0.0, 17.9],
        [0.0, 1.2, 0.0, -60.2],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _synthetic_case(tmp_path: Path, shape=(30, 26, 14)) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    image = (rng.normal(0, 400, shape) + np.linspace(-900, 900, shape[0])[:, None, None]).astype(
        np.int16
    )
    label = np.zeros(shape, np.uint8)
    label[4:14, 5:15, 3:9] = 1
    label[16:27, 12:24, 6:12] = 2
    label[2, 20, 2] = 7
    img_path, lab_path = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(image, AFFINE), img_path)
    nib.save(nib.Nifti1Image(label, AFFINE), lab_path)
    return img_path, lab_path


def _item(img: Path, lab: Path, class_id: int, match: str = "equal", ct: bool = False) -> dict:
    return {
        "image_path": str(img),
        "label_path": str(lab),
        "class_id": class_id,
        "match": match,
        "ct": ct,
        "item": 0,
    }


def _assert_same_as_inference(img: Path, lab: Path, class_ids, crop: int) -> None:
    ref = geo.preprocess_case(load_volume(img), load_volume(lab), class_ids, crop_size=crop)
    chain = T.prepare_transforms(crop_size=crop)
    for c in class_ids:
        out = chain(_item(img, lab, c))
        r = ref[c]
        assert out["image"].dtype == T.storage_image(r.roi_raw).dtype
        np.testing.assert_array_equal(out["image"], T.storage_image(r.roi_raw))
        np.testing.assert_array_equal(out["label"], r.roi_label)
        np.testing.assert_array_equal(out["affine"], r.roi_affine)
        np.testing.assert_array_equal(out["crop_start"], r.start)
        assert out["original_shape"] == r.original_shape


def test_prepare_matches_inference_preprocessing(tmp_path: Path) -> None:
    img, lab = _synthetic_case(tmp_path)
    _assert_same_as_inference(img, lab, [1, 2, 7], crop=24)


def test_prepare_case_equals_per_item_chain(tmp_path: Path) -> None:
    img, lab = _synthetic_case(tmp_path)
    targets = [(1, "equal"), (2, "equal"), (1, "nonzero")]
    many = T.prepare_case(load_volume(img), load_volume(lab), targets, crop_size=20)
    chain = T.prepare_transforms(crop_size=20)
    for (c, m), got in zip(targets, many):
        want = chain(_item(img, lab, c, m))
        for key in ("image", "label", "affine", "crop_start"):
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.shared
@pytest.mark.parametrize(
    "image,label,classes",
    [
        (
            "totalsegmentator/example_ct_sm.nii.gz",
            "totalsegmentator/example_seg.nii.gz",
            [1, 5, 52],
        ),
        ("sct_testing_data/t2.nii.gz", "sct_testing_data/t2_seg-manual_labeled.nii.gz", [2, 4]),
        ("pyradiomics/breast1_image.nii.gz", "pyradiomics/breast1_label.nii.gz", [1]),
    ],
)
def test_prepare_matches_inference_on_real_volumes(image, label, classes) -> None:
    if not (DATA / image).is_file():
        pytest.skip("shared data not present")
    _assert_same_as_inference(DATA / image, DATA / label, classes, crop=128)


def test_head_regime_skips_orientation_and_spacing(tmp_path: Path) -> None:
    img, lab = _synthetic_case(tmp_path)
    out = T.prepare_transforms(crop_size=16, resample=False, canonical=False)(_item(img, lab, 2))
    label = (np.asarray(nib.load(lab).dataobj) == 2).astype(np.uint8)
    image = np.asarray(nib.load(img).dataobj)
    want, start = geo.crop_or_pad_around_mask(image, label, 16)
    np.testing.assert_array_equal(out["image"], want)
    np.testing.assert_array_equal(out["label"], geo.crop_or_pad(label, start, 16))
    np.testing.assert_array_equal(out["affine"], geo.roi_affine(nib.load(img).affine, start))


def test_crop_or_pad_empty_label_is_centred() -> None:
    data = {
        "image": np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7),
        "label": np.zeros((5, 6, 7), np.uint8),
        "affine": np.eye(4),
    }
    out = T.CropOrPadd(4)(data)
    np.testing.assert_array_equal(out["crop_start"], geo.crop_start_centered((5, 6, 7), 4))
    assert out["image"].shape == (4, 4, 4) and not out["label"].any()


def test_rand_flip_prob_one_flips_every_axis_exactly() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 5, 6)).astype(np.float32)
    label = (image > 0).astype(np.uint8)
    out = T.RandFlipd(prob=1.0)({"image": image, "label": label}, np.random.default_rng(1))
    np.testing.assert_array_equal(out["image"], image[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(out["label"], label[::-1, ::-1, ::-1])
    one = T.RandFlipd(prob=1.0, spatial_axes=(1,))({"image": image, "label": label}, rng)
    np.testing.assert_array_equal(one["image"], image[:, ::-1])
    none = T.RandFlipd(prob=0.0)({"image": image, "label": label}, rng)
    assert none["image"] is image and none["flip_axes"] == ()


def test_rand_flip_draws_from_the_given_generator_only() -> None:
    data = {"image": np.zeros((2, 2, 2)), "label": np.zeros((2, 2, 2), np.uint8)}
    flips = [T.RandFlipd(0.5)(data, np.random.default_rng(s))["flip_axes"] for s in range(64)]
    again = [T.RandFlipd(0.5)(data, np.random.default_rng(s))["flip_axes"] for s in range(64)]
    assert flips == again
    per_axis = np.array([[a in f for a in range(3)] for f in flips]).mean(0)
    assert np.all((per_axis > 0.25) & (per_axis < 0.75))
    # The stream advances by one draw per axis whatever the outcome.
    r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
    T.RandFlipd(1.0)(data, r1)
    T.RandFlipd(0.0)(data, r2)
    assert r1.random() == r2.random()


def test_clamp_ct_rule() -> None:
    image = np.array([-3000, -1000, 0, 999, 1001, 3000], dtype=np.int16).reshape(1, 2, 3)
    clamp = T.ClampCTd()
    np.testing.assert_array_equal(
        clamp({"image": image, "ct": True})["image"].ravel(), [-1000, -1000, 0, 999, 1000, 1000]
    )
    assert clamp({"image": image, "ct": True})["image"].dtype == np.int16
    assert clamp({"image": image, "ct": False})["image"] is image
    assert clamp({"image": image})["image"] is image
    assert T.ClampCTd(mode="never")({"image": image, "ct": True})["image"] is image
    always = T.ClampCTd(mode="always")({"image": image.astype(np.float32), "ct": False})["image"]
    assert always.dtype == np.float32 and always.min() == -1000 and always.max() == 1000
    small = np.array([0, 200, 255], dtype=np.uint8).reshape(1, 1, 3)
    np.testing.assert_array_equal(
        T.ClampCTd(-10, 100, "always")({"image": small})["image"].ravel(), [0, 100, 100]
    )
    with pytest.raises(ValueError):
        T.ClampCTd(mode="sometimes")


def test_clamp_ct_same_values_for_integer_and_float_storage() -> None:
    """An int16 image and its float32 copy (as the TFDS source stores it) clamp alike,
    also for fractional bounds that integers cannot hold."""
    image = np.array([-3000, -1001, -1000, 0, 1000, 1001, 3000], dtype=np.int16).reshape(1, 1, 7)
    for lo, hi in ((-1000.0, 1000.0), (-1000.5, 1000.5), (-999.25, 250.75), (-40000.0, 40000.0)):
        clamp = T.ClampCTd(lo, hi, "always")
        from_int = clamp({"image": image})["image"]
        from_float = clamp({"image": image.astype(np.float32)})["image"]
        np.testing.assert_array_equal(from_int.astype(np.float32), from_float, err_msg=f"{lo, hi}")
        expected = np.clip(image.astype(np.float64), lo, hi).astype(np.float32)
        np.testing.assert_array_equal(from_float, expected)
    assert T.ClampCTd(-1000, 1000, "always")({"image": image})["image"].dtype == np.int16


@pytest.mark.parametrize(
    "name,expected",
    [
        ("ct_WORD", True),
        ("CT", True),
        ("ct-abdomen", True),
        ("Dataset012_ct_liver", True),
        ("mr_brats", False),
        ("ctorg", False),
        ("abdomen_ct", False),
        ("Dataset003_Liver", False),
    ],
)
def test_is_ct_name(name: str, expected: bool) -> None:
    assert T.is_ct_name(name) is expected


def test_storage_dtype_is_lossless() -> None:
    assert T.storage_image(np.array([0, 255], np.uint8)).dtype == np.int16
    assert T.storage_image(np.array([-5, 7], np.int32)).dtype == np.int16
    big = np.array([0, 40000], np.int32)
    assert T.storage_image(big).dtype == np.float32
    np.testing.assert_array_equal(T.storage_image(big), big.astype(np.float32))
    assert T.storage_image(np.array([0.5], np.float64)).dtype == np.float32


def test_to_example_and_zero_example() -> None:
    ex = T.to_example(
        {"image": np.ones((3, 3, 3), np.int16), "label": np.ones((3, 3, 3), np.uint8)}, 5
    )
    assert ex["image"].dtype == np.float32 and ex["label"].dtype == np.uint8
    assert ex["item"] == 5 and ex["valid"]
    z = T.zero_example(3, 9)
    assert z["image"].shape == (3, 3, 3) and not z["valid"] and z["item"] == 9
    assert not z["image"].any()


def test_compose_requires_rng_for_random_transforms() -> None:
    chain = T.augment_transforms(flip_prob=0.5)
    with pytest.raises(ValueError, match="random generator"):
        chain({"image": np.zeros((2, 2, 2)), "label": np.zeros((2, 2, 2), np.uint8)})
    assert len(T.augment_transforms(flip_prob=0.0).transforms) == 1
