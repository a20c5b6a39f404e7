"""Evaluation protocols: parity with the original pipeline, click rules, geometry round trips."""

from __future__ import annotations

import hashlib

import jax
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sammed3d_jax.checkpoint import load_model
from sammed3d_jax.data import (
    Volume,
    load_volume,
    original_voxel_to_roi,
    paste_back,
    preprocess_case,
    preprocess_for_class,
    resample_to_spacing,
    roi_to_original_voxel,
    to_canonical,
)
from sammed3d_jax.eval import cvpr25_step_metrics, dice, nsd, sammed3d_click
from sammed3d_jax.eval.protocols import run_cvpr25, run_protocol, run_sammed3d
from sammed3d_jax.inference import DecodeOutput, Prediction, Predictor, SamEngine
from sammed3d_jax.model.common import upsample_logits


@pytest.fixture(scope="module")
def golden_engine(fixtures_dir):
    return SamEngine(load_model(fixtures_dir / "golden_small" / "checkpoint_train_format.pth"))


@pytest.fixture(scope="module")
def t2_case(fixtures_dir):
    d = fixtures_dir / "preprocess"
    return load_volume(d / "t2.nii.gz"), load_volume(
        d / "t2_seg-manual_labeled.nii.gz", kind="label"
    )


class OracleEngine:
    """The golden stand-in model: low-res logits = 10·(avgpool4(label crop) − 0.5).

    ``encode`` receives only the normalised ROI image, so the label crop is looked up by the
    image's hash (each class of the case has its own crop).
    """

    def __init__(self, preprocessed):
        self.crop_size = 128
        self.low_res_size = 32
        self.encode_seconds = self.decode_seconds = 0.0
        self.encode_calls = self.decode_calls = 0
        self.table = {}
        for p in preprocessed.values():
            key = hashlib.sha1(p.roi_image.tobytes()).hexdigest()
            assert key not in self.table
            self.table[key] = p.roi_label
        self.points = []

    def encode(self, roi_image):
        self.encode_calls += 1
        return self.table[hashlib.sha1(np.asarray(roi_image).tobytes()).hexdigest()]

    def decode(self, label, points, labels, mask_input=None):
        self.decode_calls += 1
        self.points.append(np.asarray(points).copy())
        pooled = label.astype(np.float32).reshape(32, 4, 32, 4, 32, 4).mean(axis=(1, 3, 5))
        low = (np.float32(10) * (pooled - np.float32(0.5))).astype(np.float32)
        logits = upsample_logits(low, 128)
        return DecodeOutput(low, np.asarray(logits), np.asarray(jax.nn.sigmoid(logits)))


def test_sammed3d_protocol_reproduces_the_original_entry_point(t2_case, fixtures_dir):
    """With the golden stand-in model, one click per class gives the original's output file."""
    import json

    image, label = t2_case
    golden = json.loads((fixtures_dir / "preprocess" / "sct_t2.json").read_text())
    engine = OracleEngine(preprocess_case(image, label, crop_size=128))
    result = run_sammed3d(engine, image, label, [2, 3, 4, 5], 1)
    expected = np.asarray(
        nib.load(fixtures_dir / "preprocess" / "sct_t2_entrypoint_synthetic.nii.gz").dataobj
    )
    np.testing.assert_array_equal(result.final_prediction, expected)
    for c in (2, 3, 4, 5):
        click = result.classes[c].clicks[0]
        assert list(click.point_roi) == golden["per_class"][str(c)]["click"]["point_A0A1A2"]
        assert click.label == 1 and click.in_roi
    # Dice on the merged map as the golden records it (class 5's prediction is empty: 0).
    for c in (2, 3, 4, 5):
        ref = golden["merged"]["per_class_dice"][str(c)]["dice_entrypoint_synthetic"]
        assert result.classes[c].dice[0] == pytest.approx(ref, abs=1e-12)


class SpyEngine:
    """Wraps a SamEngine and records every decode call."""

    def __init__(self, engine):
        self.inner = engine
        self.crop_size = engine.crop_size
        self.low_res_size = engine.low_res_size
        self.calls = []

    @property
    def encode_seconds(self):
        return self.inner.encode_seconds

    @property
    def decode_seconds(self):
        return self.inner.decode_seconds

    def encode(self, roi_image):
        return self.inner.encode(roi_image)

    def decode(self, emb, points, labels, mask_input=None):
        out = self.inner.decode(emb, points, labels, mask_input)
        self.calls.append((np.asarray(points).copy(), np.asarray(labels).copy(), mask_input, out))
        return out


def test_sammed3d_clicks_follow_the_rule(t2_case, golden_engine):
    image, label = t2_case
    spy = SpyEngine(golden_engine)
    n = 4
    result = run_sammed3d(spy, image, label, [3, 4], n)
    pre = preprocess_case(image, label, [3, 4], crop_size=spy.crop_size)
    rng = np.random.RandomState(233)
    calls = iter(spy.calls)
    for c in (3, 4):
        roi_label = pre[c].roi_label
        prev = np.zeros(roi_label.shape, bool)
        low_prev = None
        for k in range(n):
            points, labels, mask_input, out = next(calls)
            point = points[-1].astype(int)
            # The newest click is a voxel of the error region (label 1 in FN, 0 in FP) ...
            fn = (roi_label > 0) & ~prev
            fp = (roi_label == 0) & prev
            if (fn | fp).any():
                assert (fn | fp)[tuple(point)]
                assert labels[-1] == int(fn[tuple(point)])
            else:
                assert roi_label[tuple(point)] == 1 and labels[-1] == 1
            # ... the very voxel the seeded reference draw picks, and clicks accumulate.
            ref_point, ref_label = sammed3d_click(prev, roi_label, rng)
            np.testing.assert_array_equal(point, ref_point)
            assert labels[-1] == ref_label and len(points) == k + 1
            rec = result.classes[c].clicks[k]
            assert list(rec.point_roi) == point.tolist() and rec.label == ref_label
            # Mask prompt: zeros first, then the previous low-res logits.
            if k == 0:
                assert mask_input is None
            else:
                np.testing.assert_array_equal(mask_input, low_prev)
            prev = out.probability > 0.5
            low_prev = out.low_res_logits
    for c in (3, 4):
        assert len(result.classes[c].dice) == n
        assert all(0.0 <= v <= 1.0 for v in result.classes[c].dice + result.classes[c].nsd)


def _component_max_edt(error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, _ = ndimage.label(error, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    comp = labels == np.argmax(sizes)
    dist = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1, 1:-1]
    return comp, dist


def test_cvpr25_clicks_follow_the_rule(t2_case, golden_engine, monkeypatch):
    image, label = t2_case
    masks = []
    original_predict = Predictor.predict

    def spy(self, *args, **kwargs):
        pred = original_predict(self, *args, **kwargs)
        masks.append(pred.mask.copy())
        return pred

    monkeypatch.setattr(Predictor, "predict", spy)
    n = 3
    result = run_cvpr25(golden_engine, image, label, [3], n)
    gt = np.asarray(label.array) == 3
    clicks = result.classes[3].clicks
    prev = np.zeros(gt.shape, bool)
    for k, click in enumerate(clicks):
        p = tuple(click.point)
        error = prev != gt
        comp, dist = _component_max_edt(error)
        assert comp[p], f"click {k + 1} is not in the largest error component"
        assert dist[p] == dist[comp].max(), f"click {k + 1} is not at the maximal distance"
        assert click.label == int(gt[p])
        assert click.step == k + 1
        prev = masks[k] > 0
    assert len(clicks) == n  # random weights never reach a perfect mask
    # Image-level values follow the challenge's step metric on the merged map.
    final = result.final_prediction
    ref = cvpr25_step_metrics(final, np.where(gt, 3, 0), label.spacing)
    assert result.image_level["dsc"][-1] == pytest.approx(ref[0], abs=1e-12)
    assert result.image_level["nsd"][-1] == pytest.approx(ref[1], abs=1e-12)
    assert result.image_level["dsc_final"] == result.image_level["dsc"][-1]
    assert result.image_level["dsc_auc"] is not None


def test_cvpr25_no_click_once_perfect(t2_case, golden_engine, monkeypatch):
    image, label = t2_case
    gt = {c: (np.asarray(label.array) == c).astype(np.uint8) for c in (2, 4)}
    calls = []

    def perfect(self, points, labels, previous_logits=None, *, mm=False):
        c = 2 if gt[2][tuple(np.asarray(points)[0])] else 4
        calls.append(c)
        n = len(points)
        z = np.zeros((1, 1, 1))
        return Prediction(
            mask=gt[c],
            roi_mask=z,
            roi_probability=z,
            low_res_logits=z,
            roi_start=np.zeros(3, np.int64),
            roi_affine=np.eye(4),
            points_roi=np.zeros((n, 3)),
            labels=np.asarray(labels),
            in_roi=np.ones(n, bool),
            encoded=False,
            mask_prompt_reset=False,
        )

    monkeypatch.setattr(Predictor, "predict", perfect)
    result = run_cvpr25(golden_engine, image, label, [2, 4], 3)
    assert calls == [2, 4]  # one click per class, none once perfect
    for c in (2, 4):
        assert len(result.classes[c].clicks) == 1
        assert result.classes[c].dice == [1.0, 1.0, 1.0]
        assert result.classes[c].nsd == [1.0, 1.0, 1.0]
    assert result.image_level["dsc"] == [1.0, 1.0, 1.0]
    assert result.image_level["dsc_auc"] == pytest.approx(2.0)
    assert result.image_level["nsd_auc"] == pytest.approx(2.0)


def test_cvpr25_nsd_gated_by_dsc(t2_case, golden_engine):
    image, label = t2_case
    result = run_protocol("cvpr25", golden_engine, image, label, [2, 3], 2)
    for k in range(2):
        dsc = np.mean([result.classes[c].dice[k] for c in (2, 3)])
        assert result.image_level["dsc"][k] == pytest.approx(dsc)
        if dsc <= 0.2:
            assert result.image_level["nsd"][k] == 0.0
    with pytest.raises(ValueError, match="unknown protocol"):
        run_protocol("nope", golden_engine, image, label, [2], 1)


def test_cvpr25_protocol_uses_no_ground_truth_for_the_crop(t2_case, golden_engine):
    """The ROI follows the clicks: its start is the click-centred crop, not the label box."""
    image, label = t2_case
    result = run_cvpr25(golden_engine, image, label, [2], 1)
    click = result.classes[2].clicks[0]
    s = golden_engine.crop_size
    np.testing.assert_array_equal(np.floor(np.asarray(click.point_roi) + 0.5), [s // 2] * 3)
    bbox_start = preprocess_for_class(image, label, 2, crop_size=s).start
    assert list(click.roi_start) != bbox_start.tolist()


# --------------------------------------------------------------------------------------
# Geometry round trips (no model)
# --------------------------------------------------------------------------------------

SHARED_PAIRS = [
    ("pyradiomics/lung1_image.nii.gz", "pyradiomics/lung1_label.nii.gz", None),
    ("pyradiomics/brain1_image.nii.gz", "pyradiomics/brain1_label.nii.gz", None),
    ("sct_testing_data/t2s.nii.gz", "sct_testing_data/t2s_gmseg_manual.nii.gz", None),
    ("sct_testing_data/t2.nii.gz", "sct_testing_data/t2_seg-manual_labeled.nii.gz", None),
    ("totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz", [1, 5, 52]),
    ("totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz", [5, 23]),
]


def _representable(label: Volume, class_id: int) -> np.ndarray:
    """The class as the 1.5 mm model grid can hold it: resampled there and pasted back."""
    binary = (np.asarray(label.array) == class_id).astype(np.uint8)
    can, can_affine, _ = to_canonical(
        *resample_to_spacing(binary, label.affine, (1.5, 1.5, 1.5), "nearest")
    )
    return paste_back(can, can_affine, label.shape, label.affine)


def _round_trip(image: Volume, label: Volume, classes, capsys, name: str) -> None:
    """Crop → model grid → paste back, without the model, for each class of a case.

    The target is the class as the 1.5 mm grid can represent it (finer detail is lost by
    any 1.5 mm pipeline, the original's included); a class with no more than 1,000 voxels on
    the file grid is replaced by a 20 mm ball around it. The raw label's round-trip Dice is
    reported next to it.
    """
    present = [int(v) for v in np.unique(label.array) if v != 0]
    rows = []
    for c in present if classes is None else classes:
        binary = np.asarray(label.array) == c
        target = _representable(label, c)
        kind = "class"
        if target.sum() <= 1000:
            centre = np.argwhere(binary).mean(axis=0)
            idx = np.indices(label.shape, dtype=np.float64)
            r2 = sum(((idx[a] - centre[a]) * label.spacing[a]) ** 2 for a in range(3))
            target = _representable(Volume((r2 <= 20.0**2).astype(np.uint8), label.affine), 1)
            kind = "20 mm ball"
        assert target.sum() > 1000
        p = preprocess_for_class(image, Volume(target, label.affine), 1, crop_size=128)
        pasted = paste_back(p.roi_label, p.roi_affine, label.shape, label.affine)
        d = dice(pasted, target)
        fits = bool(np.all(p.bbox[1] - p.bbox[0] <= 128))
        # Paste-back ties: original voxels whose continuous ROI index is a half-integer on
        # some axis (ITK rounds them by the grid origin's floating-point value).
        region = tuple(
            slice(int(lo), int(hi) + 1)
            for lo, hi in zip(
                np.argwhere(pasted | target).min(0), np.argwhere(pasted | target).max(0)
            )
        )
        idx = np.stack(
            np.meshgrid(*[np.arange(r.start, r.stop) for r in region], indexing="ij"), -1
        )
        x = original_voxel_to_roi(idx.reshape(-1, 3).astype(np.float64), label.affine, p.roi_affine)
        tie = np.any(np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-4, axis=1)
        tie = tie.reshape(idx.shape[:3])
        wrong = pasted[region] != target[region]
        d_no_ties = dice(pasted[region][~tie], target[region][~tie])
        q = preprocess_for_class(image, label, c, crop_size=128)
        raw = dice(paste_back(q.roi_label, q.roi_affine, label.shape, label.affine), binary)
        rows.append(
            f"c{c} ({kind}, {int(target.sum())} vox{'' if fits else ', wider than the ROI'}): "
            f"Dice {d:.4f}, {d_no_ties:.4f} without the {int(tie.sum())} tie voxels; "
            f"raw label {raw:.4f}"
        )
        if fits:
            assert not (wrong & ~tie).any(), f"{name} class {c}: mismatches off the ties"
            assert not d_no_ties < 0.98, f"{name} class {c}: round-trip Dice {d_no_ties:.4f}"
            if label.spacing.min() >= 1.5 - 1e-6 and binary.sum() > 1000:
                assert d >= 0.98 and raw >= 0.98, f"{name} class {c}: {d:.4f} / {raw:.4f}"
        # Clicks in original voxel indices land on the same voxels after ROI and back.
        vox = np.argwhere(binary)
        vox = vox[:: max(1, len(vox) // 50)].astype(np.float64)
        roi = original_voxel_to_roi(vox, label.affine, q.roi_affine)
        back = roi_to_original_voxel(roi, q.roi_affine, label.affine)
        np.testing.assert_array_equal(np.floor(back + 0.5), vox)
        np.testing.assert_allclose(back, vox, atol=1e-6)
    with capsys.disabled():
        print(f"\n[round trip] {name}: " + "; ".join(rows))


def test_geometry_round_trip_fixture(t2_case, capsys):
    image, label = t2_case
    _round_trip(image, label, None, capsys, "fixture t2 (PSR, 1 mm)")


@pytest.mark.shared
@pytest.mark.parametrize(("image", "label", "classes"), SHARED_PAIRS, ids=lambda v: str(v))
def test_geometry_round_trip_shared(shared_dir, image, label, classes, capsys):
    data = shared_dir / "data"
    img = load_volume(data / image)
    lab = load_volume(data / label, kind="label")
    _round_trip(img, lab, classes, capsys, image)


def _class_without_positive_voxels(s: int) -> tuple[Volume, Volume]:
    """A CT-like case: class 1 in soft tissue, class 2 in a region with no voxel > 0 (its
    ROI cannot be z-normalised)."""
    img = np.full((3 * s, s, s), -1000, np.int16)
    lab = np.zeros(img.shape, np.uint8)
    rng = np.random.default_rng(0)
    img[5 : s - 5, 5 : s - 5, 5 : s - 5] = 40 + rng.integers(0, 20, (s - 10,) * 3)
    lab[s // 4 : s // 2, s // 4 : s // 2, s // 4 : s // 2] = 1
    img[2 * s + 5 : 3 * s - 5, 5 : s - 5, 5 : s - 5] = -800
    lab[2 * s + s // 4 : 2 * s + s // 2, s // 4 : s // 2, s // 4 : s // 2] = 2
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    return Volume(img, affine), Volume(lab, affine)


def test_sammed3d_class_without_positive_voxels_gets_empty_predictions(golden_engine):
    """A class whose ROI has no voxel > 0 (lung in CT) cannot be z-normalised: as in the
    original (NaN input, empty predictions), that class scores 0 and the others still run,
    with the seeded clicks drawn exactly as if its predictions were empty."""
    s = golden_engine.crop_size
    image, label = _class_without_positive_voxels(s)
    spy = SpyEngine(golden_engine)
    result = run_sammed3d(spy, image, label, [1, 2], 2)
    assert len(spy.calls) == 2  # class 1 only
    assert result.classes[2].dice == [0.0, 0.0]
    assert any("z-normalisation undefined" in n for n in result.classes[2].notes)
    assert not (result.final_prediction == 2).any()
    pre = preprocess_case(image, label, [1, 2], crop_size=s, nan_if_undefined=True)
    assert np.isnan(pre[2].roi_image).all()
    rng_ref = np.random.RandomState(233)
    prev = np.zeros((s,) * 3, bool)
    for *_, out in spy.calls:  # class 1's draws, then class 2's from empty predictions
        sammed3d_click(prev, pre[1].roi_label, rng_ref)
        prev = out.probability > 0.5
    empty = np.zeros((s,) * 3, bool)
    for k in range(2):
        point, _ = sammed3d_click(empty, pre[2].roi_label, rng_ref)
        assert list(result.classes[2].clicks[k].point_roi) == point.tolist()
    with pytest.raises(ValueError, match="at least 2 voxels"):
        preprocess_case(image, label, [2], crop_size=s)


def test_cvpr25_class_without_positive_voxels_keeps_an_empty_prediction(golden_engine):
    """cvpr25: an ROI that cannot be z-normalised leaves that class's prediction empty (with
    a note) instead of failing the whole case; the other class is predicted as usual."""
    image, label = _class_without_positive_voxels(golden_engine.crop_size)
    result = run_cvpr25(golden_engine, image, label, [1, 2], 2)
    assert result.classes[2].dice == [0.0, 0.0]
    assert len(result.classes[2].notes) == 2
    assert all("cannot normalise" in n for n in result.classes[2].notes)
    assert [c.in_roi for c in result.classes[2].clicks] == [False, False]
    assert len(result.classes[1].dice) == 2 and result.classes[1].clicks[0].in_roi
    assert not (result.final_prediction == 2).any()


def test_sammed3d_nsd_uses_the_header_voxel_size(golden_engine):
    """As the original's compute_metrics: NSD in the label header's zooms (pixdim), with a
    note when the affine says otherwise."""
    s = golden_engine.crop_size
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    img = np.random.default_rng(1).integers(50, 150, (s, s, s)).astype(np.int16)
    lab = np.zeros((s, s, s), np.uint8)
    lab[20:40, 20:40, 20:40] = 1
    header = nib.Nifti1Header()
    header.set_data_shape(lab.shape)
    header.set_zooms((0.5, 0.5, 0.5))
    image = Volume(img, affine)
    plain = run_sammed3d(golden_engine, image, Volume(lab, affine), [1], 1)
    zoomed = run_sammed3d(golden_engine, image, Volume(lab, affine, header=header), [1], 1)
    assert plain.classes[1].dice == zoomed.classes[1].dice
    assert not any("header" in n for n in plain.classes[1].notes)
    assert any("header's voxel size [0.5, 0.5, 0.5]" in n for n in zoomed.classes[1].notes)
    pred, gt = zoomed.final_prediction == 1, lab == 1
    assert zoomed.classes[1].nsd == [nsd(pred, gt, (0.5, 0.5, 0.5), 1.0)]
    assert plain.classes[1].nsd == [nsd(pred, gt, (1.5, 1.5, 1.5), 1.0)]
    assert zoomed.classes[1].nsd != plain.classes[1].nsd
