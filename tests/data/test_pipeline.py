"""Item index and grain training/eval datasets over synthetic NIfTI folders."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.data import pipeline as P
from sammed3d_jax.data.transforms import prepare_transforms

AFFINE = np.array(
    [[-1.5, 0, 0, 20.0], [0, 1.5, 0, -12.0], [0, 0, 1.5, 7.5], [0, 0, 0, 1]], dtype=np.float64
)
SHAPE = (24, 22, 20)
CROP = 16


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def make_dataset(root: Path, n_cases: int = 4, name: str = "Dataset001_ct_toy") -> Path:
    """nnU-Net folder: per case a cube (class 1), a rod crossing the crop (2), a dot (3)."""
    ds = root / name
    meta = {
        "labels": {"background": 0, "cube": 1, "rod": 2, "dot": 3},
        "channel_names": {"0": "CT"},
    }
    ds.mkdir(parents=True, exist_ok=True)
    (ds / "dataset.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for c in range(n_cases):
        image = rng.integers(-1500, 1500, SHAPE).astype(np.int16)
        label = np.zeros(SHAPE, np.uint8)
        label[3 + c : 11 + c, 4:12, 4:12] = 1  # 512 voxels
        label[:, 15:17, 15:17] = 2  # 96 voxels, 64 inside a 16³ crop
        label[20, 2, 2] = 3  # 3.375 mm³ < 10 mm³
        _save(ds / "imagesTr" / f"case{c}_0000.nii.gz", image)
        _save(ds / "labelsTr" / f"case{c}.nii.gz", label)
    return ds


def add_bad_cases(ds: Path) -> None:
    good = np.zeros(SHAPE, np.uint8)
    good[5:12, 5:12, 5:12] = 1
    img = np.ones(SHAPE, np.int16)
    _save(ds / "labelsTr" / "missing.nii.gz", good)  # no image
    _save(ds / "imagesTr" / "mismatch_0000.nii.gz", np.ones((20, 22, 20), np.int16))
    _save(ds / "labelsTr" / "mismatch.nii.gz", good)
    nan = img.astype(np.float32)
    nan[0, 0, 0] = np.nan
    _save(ds / "imagesTr" / "nan_0000.nii.gz", nan)
    _save(ds / "labelsTr" / "nan.nii.gz", good)
    _save(ds / "imagesTr" / "flat_0000.nii.gz", np.ones((24, 22), np.int16))
    _save(ds / "labelsTr" / "flat.nii.gz", good[:, :, 0])
    _save(ds / "imagesTr" / "fourd_0000.nii.gz", np.ones((*SHAPE, 2), np.int16))
    _save(ds / "labelsTr" / "fourd.nii.gz", good)
    _save(ds / "imagesTr" / "empty_0000.nii.gz", img)
    _save(ds / "labelsTr" / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    _save(ds / "imagesTr" / "frac_0000.nii.gz", img)
    _save(ds / "labelsTr" / "frac.nii.gz", good.astype(np.float32) * 0.5)


def _cfg(root: Path, **kw) -> P.DataConfig:
    base = {"root": str(root), "crop_size": CROP, "min_crop_voxels": 50, "batch_size": 4}
    return P.DataConfig(**{**base, **kw})


def _take(ds, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path)


def test_image_with_another_affine_takes_the_labels_grid(tmp_path: Path, caplog) -> None:
    """Same shape, affines 0.5 mm apart: trained on, as the original does, on the label's grid."""
    from sammed3d_jax.data.nifti import Volume, load_volume
    from sammed3d_jax.data.transforms import prepare_case

    ds = make_dataset(tmp_path, n_cases=1)
    image_path = ds / "imagesTr" / "case0_0000.nii.gz"
    shifted = AFFINE.copy()
    shifted[:3, 3] += 0.5
    _save(image_path, np.asarray(nib.load(image_path).dataobj), shifted)
    index = P.load_index(_cfg(ds))
    assert {i.class_id for i in index.items} == {1, 2} and not index.skipped
    image, label = load_volume(image_path), load_volume(ds / "labelsTr" / "case0.nii.gz")
    with caplog.at_level("WARNING"):
        (got,) = prepare_case(image, label, [(1, "equal")], crop_size=CROP)
    assert "the image takes the label's grid" in caplog.text
    aligned = Volume(array=image.array, affine=label.affine)
    (want,) = prepare_case(aligned, label, [(1, "equal")], crop_size=CROP)
    for key in ("image", "label", "affine"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# --------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------


def test_index_thresholds_and_skips(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    add_bad_cases(ds)
    index = P.load_index(_cfg(ds, min_crop_voxels=100))
    assert [(i.case_id, i.class_id, i.class_name) for i in index.items] == [
        (f"case{c}", 1, "cube") for c in range(4)
    ]
    assert [i.index for i in index.items] == list(range(4))
    item = index.items[0]
    assert item.ct and item.match == "equal" and item.crop_voxels == 512
    assert item.volume_mm3 == pytest.approx(512 * 1.5**3)
    assert item.image == "imagesTr/case0_0000.nii.gz" and item.label == "labelsTr/case0.nii.gz"
    assert dict(index.dropped) == {
        "crop below min_crop_voxels": 4,  # the rod keeps 64 < 100 voxels in the crop
        "volume below min_volume_mm3": 4,  # the dot
    }
    assert index.skip_counts() == {
        "layout": 1,  # label without image
        "unreadable": 4,  # grid mismatch, NaN, 2D, 4D
        "empty label": 1,
        "invalid label": 1,  # non-integer values
    }
    reasons = " | ".join(s.reason for s in index.skipped)
    for word in ("grid mismatch", "non-finite", "expected a 3D volume", "no foreground"):
        assert word in reasons
    # A lower crop threshold keeps the rod too; a class filter keeps only what it names.
    assert len(P.load_index(_cfg(ds)).items) == 8
    assert {i.class_name for i in P.load_index(_cfg(ds, classes=("rod",))).items} == {"rod"}
    assert {i.class_id for i in P.load_index(_cfg(ds, classes=(1,))).items} == {1}


def test_region_classes_unite_label_values(tmp_path: Path) -> None:
    """nnU-Net v2 regions ("kidney": [1, 2, 3], as KiTS23's dataset.json) are classes whose
    target is the union of their values, cropped around the union, from files and shards."""
    from sammed3d_jax.data.records import ShardSource, write_shards

    ds = tmp_path / "Dataset220_KiTS2023"
    ds.mkdir()
    labels = {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    (ds / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "CT"}}))
    rng = np.random.default_rng(1)
    label = np.zeros(SHAPE, np.uint8)
    label[4:14, 4:14, 4:12] = 1  # kidney
    label[6:10, 6:10, 5:9] = 2  # tumour inside it
    label[12:16, 12:16, 10:14] = 3  # cyst at its edge, partly outside the kidney
    _save(ds / "imagesTr" / "case_00000_0000.nii.gz", rng.integers(-999, 999, SHAPE, np.int16))
    _save(ds / "labelsTr" / "case_00000.nii.gz", label)
    cfg = _cfg(ds, min_crop_voxels=10, min_volume_mm3=0.0)
    index = P.load_index(cfg)
    got = {(i.class_name, i.class_id, i.match) for i in index.items}
    assert got == {("tumor", 2, "equal"), ("kidney", 1, "any:1,2,3"), ("masses", 2, "any:2,3")}
    assert "label value not in dataset.json" not in index.dropped  # 1 and 3 lie in regions
    kidney = next(i for i in index.items if i.class_name == "kidney")
    assert kidney.volume_mm3 == pytest.approx(np.count_nonzero(label) * 1.5**3)
    prep = prepare_transforms(CROP, root=index.root)
    assert prep(kidney.to_sample())["label"].sum() == kidney.crop_voxels
    # The same samples from prepared shards.
    out = tmp_path / "shards"
    write_shards(cfg, out)
    shard = ShardSource(out)
    for i, item in enumerate(index.items):
        np.testing.assert_array_equal(shard[i]["label"], prep(item.to_sample())["label"])
    assert {i.class_name for i in P.load_index(_cfg(ds, classes=("kidney",))).items} == {"kidney"}


def test_index_is_stored_reused_and_rebuilt(dataset: Path, monkeypatch) -> None:
    calls = []
    real = P._analyse_case
    monkeypatch.setattr(P, "_analyse_case", lambda job: calls.append(job) or real(job))
    cfg = _cfg(dataset)
    first = P.load_index(cfg)
    assert first.path is not None and first.path.is_file() and first.path.parent == dataset
    assert len(calls) == 4
    second = P.load_index(cfg)
    assert len(calls) == 4 and second.items == first.items
    assert second.fingerprint == first.fingerprint
    # Another threshold is another index file; touching a label invalidates the index.
    P.load_index(_cfg(dataset, min_crop_voxels=60))
    assert len(calls) == 8
    label = dataset / "labelsTr" / "case1.nii.gz"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = P.load_index(cfg)
    assert len(calls) == 12 and third.fingerprint != first.fingerprint
    assert third.items == first.items


def test_index_on_sammed3d_layout(tmp_path: Path) -> None:
    label = np.zeros(SHAPE, np.uint8)
    label[4:14, 4:14, 4:14] = 1
    image = np.full(SHAPE, 100, np.int16)
    for cls, ds in (("liver", "ct_WORD"), ("kidney", "mr_Kits")):
        _save(tmp_path / cls / ds / "imagesTr" / "c1.nii.gz", image)
        _save(tmp_path / cls / ds / "labelsTr" / "c1.nii.gz", label * 255)
    index = P.build_index(_cfg(tmp_path))
    got = sorted((i.class_name, i.dataset, i.match, i.ct, i.class_id) for i in index.items)
    assert got == [
        ("kidney", "mr_Kits", "nonzero", False, 1),
        ("liver", "ct_WORD", "nonzero", True, 1),
    ]


def test_config_mapping_and_batch_checks(dataset: Path) -> None:
    cfg = P.DataConfig.from_mapping({"root": str(dataset), "spacing": [1.5, 1.5, 1.5]})
    assert cfg.spacing == (1.5, 1.5, 1.5)
    assert P.DataConfig(root=str(dataset), records="", tfds_dir="").records is None
    with pytest.raises(TypeError, match="unknown"):
        P.DataConfig.from_mapping({"rot": "x"})
    with pytest.raises(ValueError, match="divisible"):
        P.make_train_dataset(_cfg(dataset, batch_size=3), 0, process_index=0, process_count=2)
    assert P.epoch_size(10, 4) == 8 and P.epoch_size(3, 4) == 3


# --------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------


def test_train_batches_shapes_and_values(dataset: Path) -> None:
    cfg = _cfg(dataset)
    (b,) = _take(P.make_train_dataset(cfg, 0, 0, 1), 1)
    assert b["image"].shape == (4, CROP, CROP, CROP) and b["image"].dtype == np.float32
    assert b["label"].shape == (4, CROP, CROP, CROP) and b["label"].dtype == np.uint8
    assert b["item"].dtype == np.int64 and b["valid"].dtype == np.bool_ and b["valid"].all()
    assert set(np.unique(b["label"])) <= {0, 1}
    # CT dataset: clamped to [-1000, 1000]; raw intensities, not normalised.
    assert b["image"].min() == -1000 and b["image"].max() == 1000
    for j in range(4):
        assert b["label"][j].sum() >= 50


def test_determinism_seed_and_worker_independence(dataset: Path) -> None:
    cfg = _cfg(dataset)
    a = _take(P.make_train_dataset(cfg, 3, 0, 1), 4)
    assert _same(a, _take(P.make_train_dataset(cfg, 3, 0, 1), 4))
    threads = P.DataConfig(**{**cfg.__dict__, "read_threads": 3, "prefetch_batches": 4})
    assert _same(a, _take(P.make_train_dataset(threads, 3, 0, 1), 4))
    assert not _same(a, _take(P.make_train_dataset(cfg, 4, 0, 1), 4))
    # Every epoch (two global batches here) visits every item once, in a new order.
    epochs = [np.concatenate([x["item"] for x in a[i : i + 2]]) for i in (0, 2)]
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])


def test_worker_processes_give_the_same_batches_and_checkpoint(dataset: Path) -> None:
    cfg = _cfg(dataset)
    ref = _take(P.make_train_dataset(cfg, 11, 0, 1), 4)
    mp = P.DataConfig(**{**cfg.__dict__, "num_workers": 2})
    it = iter(P.make_train_dataset(mp, 11, 0, 1))
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    assert _same(ref, [*first, next(it), next(it)])
    fresh = iter(P.make_train_dataset(mp, 11, 0, 1))
    fresh.set_state(state)
    assert _same(ref[2:], [next(fresh), next(fresh)])


@pytest.mark.slow
def test_parallel_index_build_matches_serial(dataset: Path) -> None:
    serial = P.build_index(_cfg(dataset))
    parallel = P.build_index(_cfg(dataset, index_workers=2))
    assert parallel.items == serial.items and parallel.dropped == serial.dropped


def test_process_sharding_is_disjoint_and_splits_the_global_batch(dataset: Path) -> None:
    cfg = _cfg(dataset)
    single = _take(P.make_train_dataset(cfg, 5, 0, 1), 4)
    shards = [_take(P.make_train_dataset(cfg, 5, p, 2), 4) for p in range(2)]
    for step in range(4):
        p0, p1 = shards[0][step], shards[1][step]
        assert p0["image"].shape[0] == 2
        assert not set(p0["item"]) & set(p1["item"])
        # Process p holds global positions p, p + 2: the two halves make the global batch.
        for key in ("image", "label", "item"):
            np.testing.assert_array_equal(single[step][key][0::2], p0[key])
            np.testing.assert_array_equal(single[step][key][1::2], p1[key])
    for epoch in (0, 1):
        seen = [
            i for p in range(2) for s in (2 * epoch, 2 * epoch + 1) for i in shards[p][s]["item"]
        ]
        assert sorted(seen) == list(range(8))


def test_neighbouring_seeds_shuffle_independently(dataset: Path) -> None:
    """grain orders epoch k with its seed + k: seed 6 must not replay seed 5's second epoch."""
    cfg = _cfg(dataset)
    five = [b["item"] for b in _take(P.make_train_dataset(cfg, 5, 0, 1), 4)]
    six = [b["item"] for b in _take(P.make_train_dataset(cfg, 6, 0, 1), 2)]
    assert not np.array_equal(np.concatenate(five[2:]), np.concatenate(six))
    for seed in (-1, 2**40):  # any integer seed (grain itself takes [0, 2^32) only)
        assert len(_take(P.make_train_dataset(cfg, seed, 0, 1), 1)) == 1


def test_epochs_cut_to_whole_global_batches(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_cases=5)  # 10 items, global batch 4 -> 8 per epoch
    cfg = _cfg(ds)
    batches = _take(P.make_train_dataset(cfg, 0, 0, 1), 6)
    for e in range(3):
        items = np.concatenate([b["item"] for b in batches[2 * e : 2 * e + 2]])
        assert len(set(items)) == 8  # no item twice within an epoch / global step


def test_iterator_checkpoint_round_trip(dataset: Path) -> None:
    cfg = _cfg(dataset)
    it = iter(P.make_train_dataset(cfg, 2, 0, 1))
    for _ in range(3):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    fresh = iter(P.make_train_dataset(cfg, 2, 0, 1))
    fresh.set_state(state)
    assert _same(after, [next(fresh) for _ in range(3)])


def test_iterator_checkpoint_with_orbax_manager(dataset: Path, tmp_path: Path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    grain = P.grain
    if not hasattr(grain, "checkpoint") or not hasattr(grain.checkpoint, "CheckpointSave"):
        pytest.skip("this grain release has no orbax checkpoint args")
    cfg = _cfg(dataset)
    it = iter(P.make_train_dataset(cfg, 9, 0, 1))
    for _ in range(2):
        next(it)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    after = [next(it) for _ in range(2)]
    fresh = iter(P.make_train_dataset(cfg, 9, 0, 1))
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        assert mngr.latest_step() == 2
        mngr.restore(
            2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh))
        )
    assert _same(after, [next(fresh) for _ in range(2)])


def test_read_error_gives_invalid_zero_example(dataset: Path) -> None:
    cfg = _cfg(dataset, read_threads=0, prefetch_batches=0)  # synchronous: exact counts
    index = P.load_index(cfg)
    ds = P.make_train_dataset(cfg, 0, 0, 1)  # index loaded; now a file goes bad
    (dataset / "imagesTr" / "case2_0000.nii.gz").write_bytes(b"not a nifti")
    P.reset_read_error_count()
    batches = _take(ds, 2)  # one epoch
    items = np.concatenate([b["item"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    bad = {i.index for i in index.items if i.case_id == "case2"}
    assert len(bad) == 2 and set(items[~valid]) == bad
    assert P.read_error_count() == 2
    for b in batches:
        for j in np.flatnonzero(~b["valid"]):
            assert not b["image"][j].any() and not b["label"][j].any()
    # Rebuilding the index now skips the damaged case instead.
    rebuilt = P.load_index(cfg)
    assert "case2" not in {i.case_id for i in rebuilt.items}
    assert rebuilt.skip_counts() == {"unreadable": 1}


# --------------------------------------------------------------------------------------
# Eval stream
# --------------------------------------------------------------------------------------


def test_eval_dataset_is_deterministic_padded_and_unflipped(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n_cases=5)
    cfg = _cfg(ds, min_crop_voxels=100, eval_batch_size=4)  # 5 items
    batches = list(P.make_eval_dataset(cfg, 0, 1))
    assert len(batches) == 2
    items = np.concatenate([b["item"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(items, [0, 1, 2, 3, 4, -1, -1, -1])
    np.testing.assert_array_equal(valid, [True] * 5 + [False] * 3)
    index = P.load_index(cfg)
    prep = prepare_transforms(CROP, root=index.root)
    want = prep(index.items[3].to_sample())
    np.testing.assert_array_equal(batches[0]["image"][3], np.clip(want["image"], -1000, 1000))
    np.testing.assert_array_equal(batches[0]["label"][3], want["label"])
    assert _same(batches, list(P.make_eval_dataset(cfg, 0, 1)))
    per_process = [list(P.make_eval_dataset(cfg, p, 2)) for p in range(2)]
    assert [len(x) for x in per_process] == [2, 2]
    seen = [i for x in per_process for b in x for i, v in zip(b["item"], b["valid"]) if v]
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_eval_sample_spreads_over_the_whole_list(tmp_path: Path) -> None:
    """``max_items`` takes a fixed sample of the whole list, not its first items."""
    ds = make_dataset(tmp_path, n_cases=6)
    cfg = _cfg(ds, eval_batch_size=4)
    total = len(P.load_index(cfg).items)
    assert total >= 12  # a cube and a rod per case

    def valid_items(max_items: int) -> list[int]:
        batches = P.make_eval_dataset(cfg, 0, 1, max_items=max_items)
        return [int(i) for b in batches for i, v in zip(b["item"], b["valid"]) if v]

    sample = valid_items(5)
    assert len(sample) == 5 and sample == sorted(set(sample))
    assert max(sample) >= 5, sample  # reaches past the first five items (the first cases)
    assert valid_items(5) == sample  # the same sample at every evaluation
    assert valid_items(0) == valid_items(total) == list(range(total))


@pytest.mark.parametrize(
    "field,value", [("num_workers", -1), ("cache_items", -5), ("prefetch_batches", 1.5)]
)
def test_negative_or_fractional_counts_are_refused(field, value):
    with pytest.raises(ValueError, match=f"data.{field} must be an integer >= 0"):
        P.DataConfig(root="/data", **{field: value})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("splits", "Tr", "data.splits must be a list, got the string 'Tr'"),
        ("classes", "liver", "data.classes must be a list"),
        ("ct_range", (1000, -1000), "data.ct_range must be two finite numbers lo < hi"),
        ("ct_range", (1, 2, 3), "data.ct_range must be two"),
        ("ct_range", (float("nan"), 1), "data.ct_range must be two"),
    ],
)
def test_mistyped_lists_and_ranges_are_refused(field, value, message):
    """A string split into letters filtered every item out; a reversed CT range made every
    CT image one constant, and training went on."""
    with pytest.raises(ValueError, match=re.escape(message)):
        P.DataConfig(root="/data", **{field: value})
    assert P.DataConfig(root="/data", classes=["liver", 2], ct_range=[-500, 500.5]).classes == (
        "liver",
        2,
    )
