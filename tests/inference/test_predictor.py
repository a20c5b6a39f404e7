"""Predictor: click mapping, ROI placement, embedding cache, bounded recompilation, output grid."""

from __future__ import annotations

import warnings

import jax
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from sammed3d_jax.checkpoint import load_model
from sammed3d_jax.data import (
    Volume,
    VolumeError,
    load_volume,
    original_voxel_to_roi,
    roi_to_original_voxel,
    save_mask,
    voxel_to_world,
)
from sammed3d_jax.inference import (
    Prediction,
    Predictor,
    PredictorError,
    SamEngine,
    point_bucket,
    trace_counts,
)
from sammed3d_jax.inference import predictor as predictor_mod

GOLDEN_CKPT = "golden_small/checkpoint_train_format.pth"


@pytest.fixture(scope="module")
def golden_model(fixtures_dir):
    return load_model(fixtures_dir / GOLDEN_CKPT)


@pytest.fixture(scope="module")
def t2_volume(fixtures_dir):
    return load_volume(fixtures_dir / "preprocess" / "t2.nii.gz")


@pytest.fixture(scope="module")
def t2_predictor(golden_model, t2_volume):
    p = Predictor(golden_model)
    p.set_image(t2_volume)
    return p


def _synthetic_volume(shape=(200, 60, 60), spacing=1.0, seed=0) -> Volume:
    """A noisy positive-valued volume with a bright slab, on an LPS-like grid."""
    rng = np.random.default_rng(seed)
    array = (100 + 20 * rng.standard_normal(shape)).astype(np.float32)
    array[40:160, 20:40, 20:40] += 200
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = [30.0, 40.0, -10.0]
    return Volume(array=array, affine=affine)


def test_point_bucket():
    assert [point_bucket(n) for n in (0, 1, 4, 5, 8, 9, 17)] == [4, 4, 4, 8, 8, 16, 32]


def test_bounded_recompilation(golden_model):
    jax.clear_caches()  # count compilations from scratch
    predictor = Predictor(golden_model)
    predictor.set_image(_synthetic_volume(shape=(70, 60, 60)))
    clicks = [[35, 30, 30], [30, 28, 30], [40, 31, 29], [36, 25, 33], [33, 35, 27], [38, 30, 36]]
    labels = [1, 1, 0, 1, 0, 1]
    before = trace_counts()
    cache_size = getattr(predictor_mod._decode_jit, "_cache_size", None)  # private jax API
    sizes_before = cache_size() if cache_size else 0
    prev = None
    for n in range(1, 7):
        prev = predictor.predict(clicks[:n], labels[:n], prev)
        assert prev.in_roi.all()
    after = trace_counts()
    # Clicks 1-4 share the 4-slot bucket, clicks 5-6 the 8-slot bucket; one encoder trace.
    assert after["decode"] - before["decode"] == 2
    assert after["encode"] - before["encode"] == 1
    if cache_size:
        assert cache_size() - sizes_before == 2
    assert predictor.engine.encode_calls == 1
    # Replaying the session, and a 7th and 8th click, compile nothing new.
    predictor.reset()
    prev = None
    for n in range(1, 7):
        prev = predictor.predict(clicks[:n], labels[:n], prev)
    predictor.predict([*clicks, [34, 29, 31], [37, 32, 28]], [*labels, 1, 0], prev)
    assert trace_counts() == after
    assert predictor.engine.encode_calls == 1


def test_point_mask_slots_are_inert(golden_model, t2_volume):
    """Padding to a bucket gives the same logits as an exact-size prompt."""
    predictor = Predictor(golden_model)
    predictor.set_image(t2_volume)
    pred = predictor.predict([[30, 27, 26], [30, 30, 20]], [1, 0])
    emb, _ = predictor._embedding(pred.roi_start)
    graphdef, state = nnx.split(golden_model)

    @jax.jit
    def exact(state, emb, points, labels, mask):
        return nnx.merge(graphdef, state).decode(emb, points, labels, mask).low_res_logits

    low = exact(
        state,
        emb,
        pred.points_roi[None].astype(np.float32),
        pred.labels[None],
        np.zeros((1, 16, 16, 16), np.float32),
    )
    np.testing.assert_allclose(pred.low_res_logits, np.asarray(low[0, 0]), atol=1e-5)


def test_voxel_and_mm_clicks_agree(t2_predictor, t2_volume):
    voxels = np.array([[30.0, 27.0, 26.0], [31.0, 20.0, 25.0]])
    labels = [1, 0]
    mm = voxel_to_world(t2_volume.affine, voxels)
    a = t2_predictor.predict(voxels, labels)
    t2_predictor.reset()
    b = t2_predictor.predict(mm, labels, mm=True)
    np.testing.assert_array_equal(a.roi_start, b.roi_start)
    np.testing.assert_allclose(a.points_roi, b.points_roi, atol=1e-9)
    np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-5)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_roi_centred_on_click_and_mapping_round_trip(t2_predictor, t2_volume):
    t2_predictor.reset()
    click = np.array([[30.0, 27.0, 26.0]])
    pred = t2_predictor.predict(click, [1])
    s = t2_predictor.crop_size
    # The click's canonical voxel sits at ROI index S/2 on every axis (original crop rule).
    np.testing.assert_array_equal(np.floor(pred.points_roi[0] + 0.5), [s // 2] * 3)
    np.testing.assert_allclose(
        pred.points_roi, original_voxel_to_roi(click, t2_volume.affine, pred.roi_affine)
    )
    back = roi_to_original_voxel(pred.points_roi, pred.roi_affine, t2_volume.affine)
    np.testing.assert_allclose(back, click, atol=1e-9)


def test_output_mask_on_input_grid(t2_predictor, t2_volume, tmp_path):
    pred = t2_predictor.predict([[30, 27, 26]], [1])
    assert isinstance(pred, Prediction)
    assert pred.mask.shape == t2_volume.shape and pred.mask.dtype == np.uint8
    assert set(np.unique(pred.mask)) <= {0, 1}
    s = t2_predictor.crop_size
    assert pred.roi_mask.shape == (s, s, s)
    assert pred.low_res_logits.shape == (s // 4,) * 3
    assert ((pred.roi_probability >= 0) & (pred.roi_probability <= 1)).all()
    np.testing.assert_array_equal(pred.roi_mask, pred.roi_probability > 0.5)
    out = save_mask(tmp_path / "m.nii.gz", pred.mask, t2_volume)
    img = nib.load(out)
    ref = nib.load(t2_volume.path)
    assert img.shape == ref.shape
    np.testing.assert_array_equal(img.affine, ref.affine)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(ref.affine) == ("P", "S", "R")
    assert img.header.get_qform(coded=True)[1] == ref.header.get_qform(coded=True)[1]
    np.testing.assert_array_equal(np.asarray(img.dataobj), pred.mask)


def test_embedding_cache_and_recrop(golden_model):
    predictor = Predictor(golden_model)
    predictor.set_image(_synthetic_volume())
    s = predictor.crop_size
    first = predictor.predict([[60, 30, 30]], [1])
    assert first.encoded and not first.mask_prompt_reset
    second = predictor.predict([[60, 30, 30], [62, 33, 30]], [1, 0], first)
    assert not second.encoded and not second.mask_prompt_reset
    np.testing.assert_array_equal(second.roi_start, first.roi_start)
    # A click 100 voxels (67 canonical voxels) away lies outside the 64^3 ROI: re-crop.
    third = predictor.predict([[60, 30, 30], [62, 33, 30], [160, 30, 30]], [1, 0, 1], second)
    assert third.encoded and third.mask_prompt_reset
    assert not np.array_equal(third.roi_start, first.roi_start)
    assert third.in_roi.sum() >= 1
    inside = (third.points_roi >= -0.5) & (third.points_roi < s - 0.5)
    np.testing.assert_array_equal(third.in_roi, inside.all(axis=1))
    # Clicks far apart (wider than the ROI): the ROI follows the last click and the first
    # stays outside. A new click inside the current ROI keeps it: no new crop, no new
    # encoding, the mask prompt carried over (the earlier outside click does not force a
    # re-crop at every later call).
    far = [[60, 30, 30], [62, 33, 30], [160, 30, 30], [162, 31, 30]]
    fourth = predictor.predict(far, [1, 0, 1, 1], third)
    assert not fourth.encoded and not fourth.mask_prompt_reset
    np.testing.assert_array_equal(fourth.roi_start, third.roi_start)
    assert not fourth.in_roi[0]
    # The same with the logits as an array (the clicks of the last call are remembered).
    fifth = predictor.predict([*far, [161, 29, 30]], [1, 0, 1, 1, 0], fourth.low_res_logits)
    assert not fifth.mask_prompt_reset
    np.testing.assert_array_equal(fifth.roi_start, third.roi_start)
    # Going back to the first ROI re-uses its cached embedding.
    predictor.reset()
    again = predictor.predict([[60, 30, 30]], [1])
    assert not again.encoded
    np.testing.assert_array_equal(again.mask, first.mask)
    assert predictor.engine.encode_calls == 2


def test_previous_logits_as_array_or_prediction(t2_predictor):
    t2_predictor.reset()
    first = t2_predictor.predict([[30, 27, 26]], [1])
    a = t2_predictor.predict([[30, 27, 26], [30, 22, 26]], [1, 0], first)
    b = t2_predictor.predict([[30, 27, 26], [30, 22, 26]], [1, 0], first.low_res_logits)
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
    c = t2_predictor.predict([[30, 27, 26], [30, 22, 26]], [1, 0])
    assert not np.array_equal(a.low_res_logits, c.low_res_logits)


def test_engine_shares_compilations_between_models(golden_model):
    engine_a = SamEngine(golden_model)
    engine_b = SamEngine(golden_model)
    # Equal static halves hash alike, so the second engine reuses the first's executables.
    assert engine_a._flatdef == engine_b._flatdef
    assert hash(engine_a._flatdef) == hash(engine_b._flatdef)
    roi = np.zeros((engine_a.crop_size,) * 3, np.float32)
    engine_a.encode(roi)
    before = trace_counts()["encode"]
    engine_b.encode(roi)
    assert trace_counts()["encode"] == before


@pytest.mark.parametrize(
    ("points", "labels", "match"),
    [
        ([[60, 27, 26]], [1], "outside the image"),
        ([[-1, 27, 26]], [1], "outside the image"),
        ([[30, 27]], [1], "shape"),
        ([[30, 27, 26]], [2], "labels must be 0"),
        ([[30, 27, np.nan]], [1], "NaN"),
        ([[30, 27, 26]], [1, 0], "labels"),
    ],
)
def test_bad_clicks(t2_predictor, points, labels, match):
    with pytest.raises(PredictorError, match=match):
        t2_predictor.predict(points, labels)


def test_bad_image_and_state(golden_model, tmp_path):
    predictor = Predictor(golden_model)
    with pytest.raises(PredictorError, match="set_image"):
        predictor.predict([[1, 1, 1]], [1])
    bad = _synthetic_volume(shape=(20, 20, 20))
    arr = bad.array.copy()
    arr[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predictor.set_image(Volume(arr, bad.affine))
    with pytest.raises(ValueError, match="not found"):
        predictor.set_image(tmp_path / "missing.nii.gz")
    predictor.set_image(Volume(np.zeros((20, 20, 20), np.float32), bad.affine))
    with pytest.raises(PredictorError, match="normalise"):
        predictor.predict([[10, 10, 10]], [1])
    t = _synthetic_volume(shape=(20, 20, 20))
    predictor.set_image(t)
    with pytest.raises(PredictorError, match="previous_logits"):
        predictor.predict([[10, 10, 10]], [1], np.zeros((8, 8, 8), np.float32))


def test_bad_arguments_are_clear_errors(golden_model):
    with pytest.raises(ValueError, match="one number or three"):
        Predictor(golden_model, spacing=(1.5, 1.5))
    predictor = Predictor(golden_model)
    # A spacing that would make an enormous grid, and a volume thinner than one voxel.
    with pytest.raises(VolumeError, match=r"<image>: resampling to .* check the voxel spacing"):
        Predictor(golden_model, spacing=1e-3).set_image(_synthetic_volume())
    with warnings.catch_warnings():  # a grid too large for int64 is named without overflow
        warnings.simplefilter("error")
        with pytest.raises(VolumeError, match=r"gives a 2e\+32 x 6e\+31 x 6e\+31 grid"):
            Predictor(golden_model, spacing=1e-30).set_image(_synthetic_volume())
    with pytest.raises(VolumeError, match="<image>: the volume spans 1 mm"):
        predictor.set_image(Volume(np.ones((30, 30, 2), np.float32), np.diag([1, 1, 0.5, 1.0])))
    predictor.set_image(_synthetic_volume())
    first = predictor.predict([[60, 30, 30]], [1])
    with pytest.raises(PredictorError, match="previous_logits must be a Prediction"):
        predictor.predict([[60, 30, 30]], [1], {})
    with pytest.raises(PredictorError, match="non-finite"):
        predictor.predict([[60, 30, 30]], [1], np.full_like(first.low_res_logits, np.nan))
    with pytest.raises(PredictorError, match=r"\(N, 3\)"):
        predictor.to_canonical([1, 2, 3, 4])
    with pytest.raises(PredictorError, match=r"\(N, 3\).*\(3, 2\)"):
        predictor.to_canonical([[10, 20], [30, 40], [50, 60]])
    # A Prediction of another image is not a mask prompt for this one.
    predictor.set_image(_synthetic_volume(seed=1))
    with pytest.raises(PredictorError, match="Prediction of another image"):
        predictor.predict([[60, 30, 30]], [1], first)
    again = predictor.predict([[60, 30, 30]], [1])
    predictor.predict([[60, 30, 30], [62, 30, 30]], [1, 1], again)  # its own: accepted
    # Images that are neither a path nor a Volume, and in-memory volumes with bad affines.
    for image, match in (
        (np.zeros((10, 10, 10)), "a NIfTI file path or a Volume"),
        (None, "a NIfTI file path or a Volume"),
        (Volume(np.zeros((10, 10, 10)), np.eye(3)), "not a finite 4x4 matrix"),
        (Volume(np.zeros((10, 10, 10)), np.full((4, 4), np.nan)), "not a finite 4x4 matrix"),
        (Volume(np.zeros((10, 10, 10)), np.diag([1.0, 1.0, 0.0, 1.0])), "not invertible"),
    ):
        with pytest.raises((PredictorError, VolumeError), match=match):
            predictor.set_image(image)
    # A list-backed volume is taken as an array.
    listed = _synthetic_volume(shape=(20, 20, 20))
    predictor.set_image(Volume(listed.array.tolist(), listed.affine.tolist()))
    assert predictor.image.array.shape == (20, 20, 20)


def test_overlay_arguments_are_checked(tmp_path):
    from sammed3d_jax.inference import save_overlay_png

    vol = _synthetic_volume(shape=(20, 20, 20))
    mask = np.zeros((20, 20, 20), np.uint8)
    png = tmp_path / "o.png"
    for points, labels, match in (
        (np.zeros((0, 3)), [], r"\(N, 3\)"),
        ([[1, 2]], [1], r"\(N, 3\)"),
        ([[1, 2, np.nan]], [1], "finite"),
        ([[1, 2, 3], [4, 5, 6]], [1], "one 0 or 1 per point"),
        ([[1, 2, 3]], [2], "one 0 or 1 per point"),
    ):
        with pytest.raises(ValueError, match=match):
            save_overlay_png(png, vol.array, vol.affine, mask, points, labels)
    with pytest.raises(ValueError, match="3D image"):
        save_overlay_png(png, vol.array[0], vol.affine, mask[0], [[1, 2, 3]], [1])
    assert not png.exists()
    save_overlay_png(png, vol.array, vol.affine, mask, [[1, 2, 3]], [1])  # empty mask: fine
    assert png.stat().st_size > 1000


def test_a_call_without_previous_logits_starts_afresh(golden_model, t2_volume):
    """The same clicks give the same result whatever an earlier call segmented."""
    fresh = Predictor(golden_model)
    fresh.set_image(t2_volume)
    expected = fresh.predict([[30, 27, 26]], [1])
    predictor = Predictor(golden_model)
    predictor.set_image(t2_volume)
    other = predictor.predict([[20, 20, 20]], [1])
    assert not np.array_equal(other.roi_start, expected.roi_start)  # the click is inside it
    again = predictor.predict([[30, 27, 26]], [1])
    np.testing.assert_array_equal(again.roi_start, expected.roi_start)
    np.testing.assert_array_equal(again.mask, expected.mask)
    # Given the previous prediction, the session keeps that ROI.
    kept = predictor.predict([[20, 20, 20], [30, 27, 26]], [1, 1], other)
    np.testing.assert_array_equal(kept.roi_start, other.roi_start)
