"""Sliding-window tiling: window weights, growth along the target, oracle demonstrations."""

from __future__ import annotations

import numpy as np
import pytest

from sammed3d_jax.data import (
    Volume,
    load_volume,
    paste_back,
    resample_to_spacing,
    roi_affine,
    to_canonical,
    voxel_to_world,
    world_to_voxel,
)
from sammed3d_jax.eval import dice
from sammed3d_jax.inference import (
    Predictor,
    crop_start_for_points,
    label_oracle,
    tiled_segmentation,
    window_weights,
)


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[tiling] {text}")


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    r = sum(((g - c) / rad) ** 2 for g, c, rad in zip(grid, centre, radii))
    return (r <= 1.0).astype(np.uint8)


def test_window_weights():
    w = window_weights(16)
    assert w.shape == (16, 16, 16) and w.dtype == np.float32
    assert (w > 0).all()
    assert w[7:9, 7:9, 7:9].min() == w.max()
    np.testing.assert_allclose(w, w[::-1, :, :])
    np.testing.assert_allclose(w, w.transpose(1, 2, 0))
    assert w[0, 8, 8] < 0.05 * w[8, 8, 8]


def test_crop_start_for_points():
    shape = (100, 100, 100)
    # One click lands at ROI index S/2; the box of positive clicks is centred.
    np.testing.assert_array_equal(
        crop_start_for_points([[40, 50, 60]], [1], shape, 64), [8, 18, 28]
    )
    start = crop_start_for_points([[40, 50, 60], [50, 50, 60], [0, 0, 0]], [1, 1, 0], shape, 64)
    np.testing.assert_array_equal(start, [13, 18, 28])
    # Positive clicks wider than the ROI: centred on the last click.
    start = crop_start_for_points([[0, 50, 50], [90, 50, 50]], [1, 1], shape, 64)
    np.testing.assert_array_equal(start, [58, 18, 18])


def test_tiling_recovers_large_synthetic_target(capsys):
    """Offline: an ellipsoid 2.3 windows long is cut by one window and recovered by tiling."""
    s = 32
    shape = (110, 60, 50)
    label = _ellipsoid(shape, (55, 30, 25), (38, 14, 12))
    oracle = label_oracle(label, s)
    click = np.array([[50.0, 30.0, 25.0]])
    result = tiled_segmentation(shape, click, [1], oracle, crop_size=s, max_windows=27)
    single = dice(result.first_window_mask, label)
    tiled = dice(result.mask, label)
    _report(
        capsys,
        f"synthetic ellipsoid ({int(label.sum())} voxels, 77 voxels long, window {s}): "
        f"single-window Dice {single:.4f}, tiled Dice {tiled:.4f} with "
        f"{len(result.windows)} windows",
    )
    assert single < 0.8
    assert tiled > 0.95
    assert not result.reached_max_windows
    starts = {w.start for w in result.windows}
    assert len(starts) == len(result.windows)
    assert tuple(crop_start_for_points(click, [1], shape, s)) == result.windows[0].start
    assert not result.windows[0].auto_click
    assert any(w.auto_click for w in result.windows)
    for w in result.windows:
        local = click - np.asarray(w.start)
        has_user_click = bool(np.all((local >= -0.5) & (local < s - 0.5)))
        assert w.auto_click == (not has_user_click)
        if w.auto_click:  # a foreground voxel of the fused mask, inside the window
            assert w.points.shape == (1, 3) and w.labels.tolist() == [1]
            assert ((w.points >= 0) & (w.points < s)).all()
            assert label[tuple((w.points[0] + np.asarray(w.start)).astype(int))] == 1
    assert np.isneginf(result.logits[result.logits < -1e30]).all()


def test_windows_with_only_negative_clicks_get_a_positive_one(capsys):
    """A background click past the end of a long target (the usual fix for a leak) must not
    leave its windows without a positive prompt: with a model that, as SAM, predicts nothing
    from negative clicks alone, those windows would cut the target off."""
    s, shape = 32, (110, 60, 50)
    label = _ellipsoid(shape, (55, 30, 25), (38, 14, 12))
    oracle = label_oracle(label, s)

    def model(start, points, labels):
        if not (labels == 1).any():
            return np.full((s, s, s), -10.0, np.float32)
        return oracle(start, points, labels)

    clicks, labels = np.array([[50.0, 30.0, 25.0], [97.0, 30.0, 25.0]]), np.array([1, 0])
    result = tiled_segmentation(shape, clicks, labels, model, crop_size=s)
    alone = tiled_segmentation(shape, clicks[:1], labels[:1], model, crop_size=s)
    _report(capsys, f"negative click past the end: Dice {dice(result.mask, label):.4f}")
    assert dice(result.mask, label) > 0.95 and dice(alone.mask, label) > 0.95
    with_negative = [w for w in result.windows if (w.labels == 0).any()]
    assert with_negative
    for w in with_negative:  # the user's negative click kept, a positive one added
        assert w.auto_click and w.labels.tolist() == [1, 0]
        np.testing.assert_allclose(w.points[1], clicks[1] - np.asarray(w.start))
        assert label[tuple((w.points[0] + np.asarray(w.start)).astype(int))] == 1


def test_tiling_respects_max_windows():
    s = 32
    shape = (110, 60, 50)
    label = _ellipsoid(shape, (55, 30, 25), (38, 14, 12))
    result = tiled_segmentation(
        shape, [[50.0, 30.0, 25.0]], [1], label_oracle(label, s), crop_size=s, max_windows=2
    )
    assert len(result.windows) == 2
    assert result.reached_max_windows


def test_every_positive_click_gets_a_window():
    """Two separate targets, one click in each, further apart than a window: both are
    segmented (growth from the first window alone never reaches the second)."""
    s, shape = 32, (160, 40, 40)
    label = _ellipsoid(shape, (20, 20, 20), (8, 8, 8)) | _ellipsoid(shape, (140, 20, 20), (8, 8, 8))
    clicks = [[20.0, 20.0, 20.0], [140.0, 20.0, 20.0]]
    oracle = label_oracle(label, s)
    result = tiled_segmentation(shape, clicks, [1, 1], oracle, crop_size=s, max_windows=27)
    mask = result.mask.astype(bool)
    for centre in ((20, 20, 20), (140, 20, 20)):
        assert mask[centre], centre
    assert dice(mask, label) > 0.9 and not result.reached_max_windows
    # A background click far away needs no window; the window limit still holds.
    only_one = tiled_segmentation(shape, clicks, [1, 0], oracle, crop_size=s)
    assert only_one.mask[20, 20, 20] and not only_one.mask[140, 20, 20]
    capped = tiled_segmentation(shape, clicks, [1, 1], oracle, crop_size=s, max_windows=1)
    assert len(capped.windows) == 1 and capped.reached_max_windows
    with pytest.raises(ValueError, match="max_windows must be an integer"):
        tiled_segmentation(shape, clicks, [1, 1], oracle, crop_size=s, max_windows=2.5)


def test_tiling_ignores_targets_that_fit():
    s = 32
    shape = (80, 80, 80)
    label = _ellipsoid(shape, (40, 40, 40), (8, 8, 8))
    result = tiled_segmentation(
        shape, [[40.0, 40.0, 40.0]], [1], label_oracle(label, s), crop_size=s
    )
    assert len(result.windows) == 1
    np.testing.assert_array_equal(result.mask, result.first_window_mask)


def test_predict_tiled_maps_back_to_the_original_grid(capsys, fixtures_dir):
    """Predictor.predict_tiled with an oracle on an in-memory anisotropic LPS volume."""
    from sammed3d_jax.checkpoint import load_model

    shape = (160, 50, 24)
    affine = np.diag([-1.0, -1.2, 3.0, 1.0])
    affine[:3, 3] = [80.0, 30.0, -30.0]
    label = np.zeros(shape, np.uint8)
    label[10:150, 12:38, 5:19] = 1  # a 140 mm long bar
    image = Volume(array=(100 + 300 * label.astype(np.int16)), affine=affine)
    predictor = Predictor(load_model(fixtures_dir / "golden_small/checkpoint_train_format.pth"))
    predictor.set_image(image)
    can_label, can_affine, _ = to_canonical(
        *resample_to_spacing(label, affine, (1.5, 1.5, 1.5), "nearest")
    )
    np.testing.assert_allclose(can_affine, predictor.canonical_affine)
    oracle = label_oracle(can_label, predictor.crop_size)
    out = predictor.predict_tiled([[80, 25, 12]], [1], window_fn=oracle)
    assert out.mask.shape == shape and out.mask.dtype == np.uint8
    single = paste_back(out.tiling.first_window_mask, can_affine, shape, affine)
    d_single, d_tiled = dice(single, label), dice(out.mask, label)
    _report(
        capsys,
        f"LPS volume {shape}, 140 mm target, window {predictor.crop_size}: single-window Dice "
        f"{d_single:.4f}, tiled Dice {d_tiled:.4f} ({len(out.tiling.windows)} windows)",
    )
    assert d_single < 0.85
    assert d_tiled > 0.95


@pytest.mark.shared
def test_tiling_recovers_the_liver(shared_dir, capsys):
    """Real CT: the liver (class 5) is 136 voxels wide at 1.5 mm, more than one 128^3 window."""
    data = shared_dir / "data" / "totalsegmentator"
    label_vol = load_volume(data / "example_seg_fast_force_split.nii.gz", kind="label")
    liver = (np.asarray(label_vol.array) == 5).astype(np.uint8)
    can_label, can_affine, _ = to_canonical(
        *resample_to_spacing(liver, label_vol.affine, (1.5, 1.5, 1.5), "nearest")
    )
    fg = np.argwhere(can_label)
    lo, hi = fg.min(axis=0), fg.max(axis=0) + 1
    assert (hi - lo).max() > 128
    # Ceiling: the same oracle in one 256^3 window that holds the whole liver.
    big_start = (lo + hi - 256) // 2
    ceiling_mask = (label_oracle(can_label, 256)(big_start, None, None) > 0).astype(np.uint8)
    ceiling = dice(
        paste_back(ceiling_mask, roi_affine(can_affine, big_start), liver.shape, label_vol.affine),
        liver,
    )
    vox = np.argwhere(liver)
    centre = vox[np.argmin(np.sum((vox - vox.mean(axis=0)) ** 2, axis=1))]
    # A click in the left lobe: the liver voxel nearest to 15 % of the extent along A0.
    world = voxel_to_world(label_vol.affine, vox)
    target = np.percentile(world[:, 0], 15)
    off = vox[np.argmin(np.abs(world[:, 0] - target) + 1e-3 * np.sum((vox - centre) ** 2, 1))]
    lines = []
    for name, click in (("central", centre), ("off-centre", off)):
        can_click = world_to_voxel(can_affine, voxel_to_world(label_vol.affine, click[None]))
        result = tiled_segmentation(
            can_label.shape, can_click, [1], label_oracle(can_label, 128), crop_size=128
        )
        single = paste_back(result.first_window_mask, can_affine, liver.shape, label_vol.affine)
        tiled = paste_back(result.mask, can_affine, liver.shape, label_vol.affine)
        d_single, d_tiled = dice(single, liver), dice(tiled, liver)
        lines.append(
            f"{name} click {click.tolist()}: single-window Dice {d_single:.4f}, tiled Dice "
            f"{d_tiled:.4f} ({len(result.windows)} windows)"
        )
        assert d_single < ceiling - 0.01
        assert d_tiled > ceiling - 0.005
        if name == "off-centre":
            assert d_single < 0.9
    _report(
        capsys,
        f"TotalSegmentator example_ct liver (class 5, {int(liver.sum())} voxels, extent "
        f"{(hi - lo).tolist()} voxels at 1.5 mm), 128^3 windows, oracle ceiling (one 256^3 "
        f"window) Dice {ceiling:.4f}; " + "; ".join(lines),
    )


def test_predict_tiled_covers_the_border_planes_as_one_roi_does(fixtures_dir):
    """The 1.5 mm grid of a 100-voxel, 0.7 mm axis is 46 voxels (69 mm of 70): the original's
    outermost planes lie just outside it. One ROI pasted back still covers them (its padding
    does), so the tiled fusion must too."""
    from sammed3d_jax.checkpoint import load_model

    rng = np.random.default_rng(0)
    image = Volume(
        array=(100 + 20 * rng.standard_normal((100, 100, 100))).astype(np.float32),
        affine=np.diag([0.7, 0.7, 0.7, 1.0]),
    )
    predictor = Predictor(load_model(fixtures_dir / "golden_small/checkpoint_train_format.pth"))
    predictor.set_image(image)
    s = predictor.crop_size
    assert predictor.canonical_image.shape == (46, 46, 46)

    def everywhere(start, points, labels):
        return np.full((s, s, s), 10.0, np.float32)

    tiled = predictor.predict_tiled([[50, 50, 50]], [1], window_fn=everywhere)
    assert tiled.tiling.mask.shape == (46, 46, 46) and tiled.tiling.mask.all()
    start = crop_start_for_points(
        predictor.to_canonical([[50, 50, 50]]), np.ones(1), (46, 46, 46), s
    )
    one_roi = paste_back(
        np.ones((s, s, s), np.uint8),
        roi_affine(predictor.canonical_affine, start),
        image.shape,
        image.affine,
    )
    assert one_roi.all()
    np.testing.assert_array_equal(tiled.mask, one_roi)


def test_windows_that_cannot_be_predicted_are_skipped(fixtures_dir, monkeypatch):
    """A window whose ROI cannot be z-normalised (air only) is skipped, not fatal; when the
    clicks' own window cannot be, the error is raised as predict() raises it."""
    from sammed3d_jax.checkpoint import load_model
    from sammed3d_jax.inference import RoiNormalizationError

    predictor = Predictor(load_model(fixtures_dir / "golden_small/checkpoint_train_format.pth"))
    predictor.set_image(
        Volume(np.full((180, 40, 40), 100.0, np.float32), np.diag([1.5] * 3 + [1.0]))
    )
    s = predictor.crop_size

    def air_beyond(limit):
        def window_logits(start, points, labels):
            if start[0] >= limit:
                raise RoiNormalizationError(f"window at {list(start)}: air")
            return np.full((s, s, s), 10.0, np.float32)

        return window_logits

    monkeypatch.setattr(predictor, "window_logits", air_beyond(40))
    out = predictor.predict_tiled([[20, 20, 20]], [1])
    assert out.tiling.windows and out.tiling.skipped_windows
    assert all(w[0] >= 40 for w in out.tiling.skipped_windows)
    assert all(w.start[0] < 40 for w in out.tiling.windows)
    assert out.mask[:40].all() and not out.mask[-1].any()
    monkeypatch.setattr(predictor, "window_logits", air_beyond(-1000))
    with pytest.raises(RoiNormalizationError, match="air"):
        predictor.predict_tiled([[20, 20, 20]], [1])
