"""ArrayRecord shards (and the TFDS builder): conversion, identical batches, damage detection."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.data import geometry as geo
from sammed3d_jax.data import pipeline as P
from sammed3d_jax.data import records as R
from sammed3d_jax.data.nifti import load_volume
from sammed3d_jax.data.transforms import prepare_transforms

SHARED = Path(
    os.environ.get("SAMMED3D_SHARED", Path(__file__).resolve().parents[2].parent / "shared")
)
DATA = SHARED / "data"
AFFINE = np.array(
    [[0, 0, 2.0, -10.0], [-1.25, 0, 0, 30.0], [0, 1.75, 0, 5.0], [0, 0, 0, 1]], dtype=np.float64
)
CROP = 16


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def make_dataset(root: Path) -> Path:
    """Two nnU-Net datasets: CT int16 (two classes per case) and MR float32 (one class)."""
    rng = np.random.default_rng(1)
    ct = root / "Dataset001_ct_toy"
    ct.mkdir(parents=True)
    (ct / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 4}}))
    for c in range(3):
        shape = (22 + c, 18, 15)
        label = np.zeros(shape, np.uint8)
        label[2 + c : 12 + c, 3:13, 2:9] = 1
        label[12:20, 8:16, 6:14] = 4
        _save(
            ct / "imagesTr" / f"ct{c}_0000.nii.gz",
            rng.integers(-2000, 2000, shape).astype(np.int16),
        )
        _save(ct / "labelsTr" / f"ct{c}.nii.gz", label)
    mr = root / "Dataset002_mr_toy"
    for c in range(3):
        shape = (20, 20, 12)
        label = np.zeros(shape, np.float64)
        label[5:15, 4:14, 2:10] = 2
        image = rng.normal(300, 80, shape).astype(np.float32)
        _save(mr / "imagesTr" / f"mr{c}_0000.nii.gz", image)
        _save(mr / "labelsTr" / f"mr{c}.nii.gz", label)
    return root


def _cfg(root: Path, **kw) -> P.DataConfig:
    base = {"root": str(root), "crop_size": CROP, "min_crop_voxels": 100, "batch_size": 4}
    return P.DataConfig(**{**base, **kw})


def _shard_cfg(cfg: P.DataConfig, shards: Path, **kw) -> P.DataConfig:
    return P.DataConfig(**{**cfg.__dict__, "root": None, "records": str(shards), **kw})


def _take(ds, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[P.DataConfig, Path]:
    root = make_dataset(tmp_path_factory.mktemp("nifti"))
    cfg = _cfg(root)
    out = tmp_path_factory.mktemp("shards")
    R.write_shards(cfg, out, records_per_shard=4, compression="uncompressed")
    return cfg, out


# --------------------------------------------------------------------------------------
# Record format
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,codec", [(np.int16, "raw"), (np.float32, "raw"), (np.int16, "zlib")]
)
def test_record_round_trip(dtype, codec) -> None:
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 500, (5, 6, 7))).astype(dtype)
    label = (rng.random((5, 6, 7)) > 0.6).astype(np.uint8)  # 210 voxels: not a byte multiple
    meta = {"item": 3, "roi_affine": np.eye(4), "case_id": "c", "spacing": np.float64(1.5)}
    out = R.decode_record(R.encode_record(image, label, meta, image_codec=codec))
    assert out["image"].dtype == dtype
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["label"], label)
    assert out["meta"] == {
        "item": 3,
        "roi_affine": np.eye(4).tolist(),
        "case_id": "c",
        "spacing": 1.5,
    }


def test_record_damage_is_detected() -> None:
    data = bytearray(
        R.encode_record(np.zeros((4, 4, 4), np.int16), np.ones((4, 4, 4), np.uint8), {"item": 0})
    )
    bad = bytearray(data)
    bad[-3] ^= 0xFF
    with pytest.raises(ValueError, match="CRC"):
        R.decode_record(bytes(bad))
    with pytest.raises(ValueError, match="magic"):
        R.decode_record(b"XXXXXXXX" + bytes(data[8:]))
    with pytest.raises(ValueError, match="binary"):
        R.encode_record(np.zeros((2, 2, 2)), np.full((2, 2, 2), 2), {})


# --------------------------------------------------------------------------------------
# Conversion and equality with the NIfTI path
# --------------------------------------------------------------------------------------


def test_shards_hold_the_prepared_items(converted) -> None:
    cfg, out = converted
    index = P.load_index(cfg)
    assert len(index.items) == 9  # 3 CT cases x 2 classes + 3 MR cases
    manifest = R.read_manifest(out)
    assert manifest["num_records"] == 9
    assert [s["num_records"] for s in manifest["shards"]] == [4, 4, 1]
    assert manifest["prepare"] == cfg.prepare_params()
    src = R.ShardSource(out)
    prep = prepare_transforms(CROP, root=index.root)
    for item in index.items:
        got, want = src[item.index], prep(item.to_sample())
        assert got["image"].dtype == want["image"].dtype == (np.int16 if item.ct else np.float32)
        for key in ("image", "label", "affine", "crop_start"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        meta = got["meta"]
        assert (meta["case_id"], meta["class_id"], meta["ct"]) == (
            item.case_id,
            item.class_id,
            item.ct,
        )
        assert meta["original_shape"] == list(want["original_shape"])
        np.testing.assert_array_equal(meta["original_affine"], want["original_affine"])


def test_identical_batches_from_nifti_and_shards(converted) -> None:
    cfg, out = converted
    scfg = _shard_cfg(cfg, out)
    _assert_same_batches(
        _take(P.make_train_dataset(cfg, 21, 0, 1), 5),
        _take(P.make_train_dataset(scfg, 21, 0, 1), 5),
    )
    _assert_same_batches(
        _take(P.make_train_dataset(cfg, 4, 1, 2), 3), _take(P.make_train_dataset(scfg, 4, 1, 2), 3)
    )
    _assert_same_batches(
        list(P.make_eval_dataset(cfg, 0, 1)), list(P.make_eval_dataset(scfg, 0, 1))
    )


def test_shard_compression_options_decode_identically(converted, tmp_path: Path) -> None:
    cfg, out = converted
    ref = R.ShardSource(out)
    for comp, codec in (("zstd:1", "raw"), ("snappy", "zlib")):
        d = tmp_path / f"{comp}-{codec}".replace(":", "")
        R.write_shards(cfg, d, records_per_shard=100, compression=comp, image_codec=codec)
        src = R.ShardSource(d)
        for i in range(len(ref)):
            np.testing.assert_array_equal(src[i]["image"], ref[i]["image"])
            np.testing.assert_array_equal(src[i]["label"], ref[i]["label"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"records_per_shard": 0}, "records_per_shard must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"image_codec": "png"}, "image_codec must be 'raw' or 'zlib'"),
        ({"compression": "gzip"}, "compression must be 'uncompressed', 'snappy'"),
    ],
)
def test_bad_shard_options_are_named_before_any_work(converted, tmp_path, kwargs, message):
    cfg, _ = converted
    with pytest.raises(ValueError, match=re.escape(message)):
        R.write_shards(cfg, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_shards_reject_other_preprocessing(converted) -> None:
    cfg, out = converted
    with pytest.raises(ValueError, match="prepared with"):
        P.make_train_dataset(_shard_cfg(cfg, out, crop_size=32), 0, 0, 1)


def test_shards_report_item_settings_they_ignore(converted, caplog) -> None:
    cfg, out = converted
    with caplog.at_level("WARNING"):
        P.make_train_dataset(_shard_cfg(cfg, out, min_crop_voxels=7), 0, 0, 1)
    assert "ignoring min_crop_voxels=7 (data: 100)" in caplog.text


def test_empty_shards_are_a_clear_error(converted, tmp_path: Path) -> None:
    cfg, _ = converted
    empty = P.DataConfig(**{**cfg.__dict__, "min_crop_voxels": 10**9})
    R.write_shards(empty, tmp_path / "empty", compression="uncompressed")
    shards = _shard_cfg(empty, tmp_path / "empty")
    with pytest.raises(P.LayoutError, match="empty: no training records"):
        P.make_train_dataset(shards, 0, 0, 1)
    with pytest.raises(P.LayoutError, match="empty: no evaluation records"):
        P.make_eval_dataset(shards, 0, 1)


# --------------------------------------------------------------------------------------
# Damage
# --------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_or_truncated_shard_is_an_error(converted, tmp_path: Path) -> None:
    _, out = converted
    gone = _copy(out, tmp_path / "gone")
    name = R.read_manifest(gone)["shards"][1]["file"]
    (gone / name).unlink()
    with pytest.raises(R.ShardError, match=f"{name}: shard missing"):
        R.ShardSource(gone)
    cut = _copy(out, tmp_path / "cut")
    data = (cut / name).read_bytes()
    (cut / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(R.ShardError, match=f"{name}: .*records, manifest lists 4"):
        R.ShardSource(cut)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(R.ShardError, match="manifest not found"):
        R.ShardSource(empty)


def test_corrupt_record_names_shard_and_index(converted, tmp_path: Path) -> None:
    cfg, out = converted
    bad = _copy(out, tmp_path / "bad")
    name = R.read_manifest(bad)["shards"][0]["file"]
    data = bytearray((bad / name).read_bytes())
    starts = [i for i in range(len(data)) if data.startswith(b"SM3DREC1", i)]
    assert len(starts) == 4  # uncompressed: every record is visible in the file
    data[starts[2] + 2000] ^= 0xFF  # inside record 2's image
    (bad / name).write_bytes(bytes(data))
    src = R.ShardSource(bad)
    src[1]  # the neighbours still read
    src[3]
    with pytest.raises(R.RecordError, match=rf"{name}: record 2 \(global index 2\)"):
        src[2]
    # In a training stream the error surfaces instead of a silently replaced example.
    with pytest.raises(R.RecordError, match=name):
        _take(P.make_eval_dataset(_shard_cfg(cfg, bad, read_threads=0), 0, 1), 3)


# --------------------------------------------------------------------------------------
# Real volumes
# --------------------------------------------------------------------------------------

REAL = [
    (
        "Dataset001_ct_totalseg",
        "ct_sm",
        "totalsegmentator/example_ct_sm.nii.gz",
        "totalsegmentator/example_seg.nii.gz",
    ),
    (
        "Dataset002_mr_sct",
        "t1w",
        "sct_testing_data/t1w.nii.gz",
        "sct_testing_data/t1w_seg-manual.nii.gz",
    ),
    (
        "Dataset002_mr_sct",
        "t2",
        "sct_testing_data/t2.nii.gz",
        "sct_testing_data/t2_seg-manual_labeled.nii.gz",
    ),
    (
        "Dataset003_mr_pyradiomics",
        "breast1",
        "pyradiomics/breast1_image.nii.gz",
        "pyradiomics/breast1_label.nii.gz",
    ),
]


@pytest.mark.shared
def test_real_volumes_convert_and_match(tmp_path: Path) -> None:
    if not all((DATA / i).is_file() and (DATA / l).is_file() for _, _, i, l in REAL):
        pytest.skip("shared data not present")
    root = tmp_path / "nifti"
    for ds, case, image, label in REAL:
        (root / ds / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / ds / "labelsTr").mkdir(parents=True, exist_ok=True)
        os.symlink(DATA / image, root / ds / "imagesTr" / f"{case}_0000.nii.gz")
        os.symlink(DATA / label, root / ds / "labelsTr" / f"{case}.nii.gz")
    cfg = P.DataConfig(root=str(root), batch_size=2)  # released-regime defaults, 128³
    index = P.load_index(cfg)
    by_case = {}
    for it in index.items:
        by_case.setdefault(it.case_id, []).append(it.class_id)
    # The 143-voxel breast lesion and the cord's vertebral levels (< 1001 voxels at 1.5 mm)
    # fall below the loader threshold.
    assert "breast1" not in by_case and "t2" not in by_case
    assert by_case["t1w"] == [1] and len(by_case["ct_sm"]) > 10
    assert index.dropped["crop below min_crop_voxels"] >= 5
    assert all(it.ct == (it.dataset == "Dataset001_ct_totalseg") for it in index.items)
    out = tmp_path / "shards"
    R.write_shards(cfg, out, records_per_shard=16)
    src = R.ShardSource(out)
    assert len(src) == len(index.items)
    for case, image, label in (("ct_sm", *REAL[0][2:]), ("t1w", *REAL[1][2:])):
        ids = by_case[case][:3]
        ref = geo.preprocess_case(load_volume(DATA / image), load_volume(DATA / label), ids)
        for it in index.items:
            if it.case_id == case and it.class_id in ids:
                got, want = src[it.index], ref[it.class_id]
                np.testing.assert_array_equal(got["image"], want.roi_raw)
                np.testing.assert_array_equal(got["label"], want.roi_label)
                np.testing.assert_array_equal(got["affine"], want.roi_affine)
                np.testing.assert_array_equal(got["crop_start"], want.start)
    scfg = _shard_cfg(cfg, out)
    raw = _take(P.make_train_dataset(cfg, 2023, 0, 1), 2)
    _assert_same_batches(raw, _take(P.make_train_dataset(scfg, 2023, 0, 1), 2))
    assert all(b["valid"].all() for b in raw)


# --------------------------------------------------------------------------------------
# TFDS builder (ArrayRecord, no TensorFlow)
# --------------------------------------------------------------------------------------


def test_tfds_builder_without_tensorflow(converted, tmp_path: Path) -> None:
    pytest.importorskip("tensorflow_datasets")
    from sammed3d_jax.data.tfds_builder import TfdsSource, prepare_tfds

    cfg, _ = converted
    path = prepare_tfds(cfg, tmp_path / "tfds")
    assert "tensorflow" not in sys.modules
    src = TfdsSource(path)
    assert len(src) == len(P.load_index(cfg).items)
    tcfg = P.DataConfig(**{**cfg.__dict__, "root": None, "tfds_dir": path})
    _assert_same_batches(
        _take(P.make_train_dataset(cfg, 8, 0, 1), 3), _take(P.make_train_dataset(tcfg, 8, 0, 1), 3)
    )
    assert "tensorflow" not in sys.modules
    assert prepare_tfds(cfg, tmp_path / "tfds") == path  # the same dataset: reused
    other = P.DataConfig(**{**cfg.__dict__, "min_crop_voxels": 7})
    with pytest.raises(ValueError, match=r"already holds a dataset prepared differently.*min_crop"):
        prepare_tfds(other, tmp_path / "tfds")


def test_tfds_folder_of_changed_source_files_is_refused(tmp_path: Path) -> None:
    """A prepared TFDS folder is reused only for the very files it was made from: a case
    changed (or added, or removed) under the same root since is an error, not stale data."""
    pytest.importorskip("tensorflow_datasets")
    import os

    from sammed3d_jax.data.tfds_builder import prepare_tfds

    cfg = _cfg(make_dataset(tmp_path / "nifti"))
    path = prepare_tfds(cfg, tmp_path / "tfds")
    assert prepare_tfds(cfg, tmp_path / "tfds") == path
    label = sorted(Path(cfg.root).rglob("labelsTr/*.nii.gz"))[0]
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten since
    with pytest.raises(ValueError, match=r"prepared differently.*index_fingerprint"):
        prepare_tfds(cfg, tmp_path / "tfds")


@pytest.mark.slow
def test_parallel_conversion_matches_serial(converted, tmp_path: Path) -> None:
    cfg, out = converted
    R.write_shards(
        cfg, tmp_path / "par", records_per_shard=4, compression="uncompressed", num_workers=2
    )
    a, b = R.ShardSource(out), R.ShardSource(tmp_path / "par")
    assert [a.read_bytes(i) for i in range(len(a))] == [b.read_bytes(i) for i in range(len(b))]


def test_ordered_map_keeps_order_and_bounds_the_work_in_flight() -> None:
    """Conversion workers run at most ``ahead`` cases past the one being written."""
    import threading
    from concurrent import futures

    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        return i * i

    with futures.ThreadPoolExecutor(4) as pool:
        out = []
        for n, result in enumerate(R.ordered_map(pool, work, range(20), ahead=3)):
            # submitted: this result, the two after it, and the one that replaced it
            assert len(started) <= n + 4, (n, started)
            out.append(result)
        assert list(R.ordered_map(pool, work, [], ahead=2)) == []
    assert out == [i * i for i in range(20)]


def test_shard_source_keeps_few_files_open(converted, tmp_path: Path, monkeypatch) -> None:
    """Shuffled reads reach every shard; only the most recent shards stay open."""
    cfg, _ = converted
    out = tmp_path / "shards"  # this test's own files: other sources' readers do not count
    R.write_shards(cfg, out, records_per_shard=4, compression="uncompressed")
    monkeypatch.setattr(R, "MAX_OPEN_SHARDS", 1)
    src = R.ShardSource(out)
    fds = Path("/proc/self/fd")

    def shard_files() -> int:
        targets = []
        for fd in list(fds.iterdir()):
            try:
                targets.append(os.readlink(fd))
            except OSError:  # the listing's own descriptor, closed by now
                pass
        return sum(t.startswith(str(out)) for t in targets)

    reads = [src.read_bytes(i) for i in (0, 4, 8, 0, 5)]  # shards 0, 1, 2, 0, 1
    assert shard_files() <= 1
    assert reads[0] == reads[3] and len(src._readers) == 1
    src.close()
