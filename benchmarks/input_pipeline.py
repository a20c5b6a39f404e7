"""Input-pipeline throughput: volumes/s from raw NIfTI folders vs ArrayRecord shards.

Builds an nnU-Net-style folder of links to the real volumes in ``<shared>/data`` (CT and MR,
multi-class and binary labels, 0.5-6.5 mm spacings), indexes it, converts it to shards,
then times ``make_train_dataset`` (128³ crops, flips, CT clamp) from both sources with
one worker (grain ``num_workers=0``, one read thread: one core) and with ``N`` worker
processes. Warm-up batches are excluded. Also times the decode of one record under each
shard compression option. The last line printed is one JSON object.

    python benchmarks/input_pipeline.py [--shared ../shared] [--workers 2] [--tfds]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sammed3d_jax.data.pipeline import DataConfig, load_index, make_train_dataset  # noqa: E402
from sammed3d_jax.data.records import ShardSource, decode_record, write_shards  # noqa: E402

# (dataset folder, case id, image, label, dataset.json labels or None), paths under data/.
PAIRS = [
    ("Dataset001_ct_totalseg", "ct_sm", "totalsegmentator/example_ct_sm.nii.gz",
     "totalsegmentator/example_seg.nii.gz"),
    ("Dataset001_ct_totalseg", "ct", "totalsegmentator/example_ct.nii.gz",
     "totalsegmentator/example_seg_fast_force_split.nii.gz"),
    ("Dataset002_ct_crops", "aorta", "totalsegmentator/aorta_ct_cropped_1.5mm.nii.gz",
     "totalsegmentator/aorta_ct_cropped_1.5mm_aorta.nii.gz"),
    ("Dataset002_ct_crops", "pulmonary", "totalsegmentator/pulmonary_ct_cropped_1.5mm.nii.gz",
     "totalsegmentator/pulmonary_ct_cropped_1.5mm_pulmonary_artery.nii.gz"),
    ("Dataset003_ct_pyradiomics", "lung1", "pyradiomics/lung1_image.nii.gz",
     "pyradiomics/lung1_label.nii.gz"),
    ("Dataset004_mr_totalseg", "mr_sm", "totalsegmentator/example_mr_sm.nii.gz",
     "totalsegmentator/example_seg_mr.nii.gz"),
    ("Dataset005_mr_pyradiomics", "brain1", "pyradiomics/brain1_image.nii.gz",
     "pyradiomics/brain1_label.nii.gz"),
    ("Dataset005_mr_pyradiomics", "breast1", "pyradiomics/breast1_image.nii.gz",
     "pyradiomics/breast1_label.nii.gz"),
    ("Dataset006_mr_sct", "t2", "sct_testing_data/t2.nii.gz",
     "sct_testing_data/t2_seg-manual_labeled.nii.gz"),
    ("Dataset006_mr_sct", "t1w", "sct_testing_data/t1w.nii.gz",
     "sct_testing_data/t1w_seg-manual.nii.gz"),
    ("Dataset006_mr_sct", "t2s", "sct_testing_data/t2s.nii.gz",
     "sct_testing_data/t2s_gmseg_manual.nii.gz"),
]  # fmt: skip


def shared_root(arg: str | None) -> Path:
    for cand in (arg, os.environ.get("SAMMED3D_SHARED"), REPO.parent / "shared"):
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand)
    raise SystemExit("shared data folder not found (--shared or $SAMMED3D_SHARED)")


def link_dataset(data: Path, dst: Path) -> Path:
    """An nnU-Net-layout folder of symlinks to the shared volumes."""
    for ds, case, image, label in PAIRS:
        if not (data / image).is_file() or not (data / label).is_file():
            continue
        (dst / ds / "imagesTr").mkdir(parents=True, exist_ok=True)
        (dst / ds / "labelsTr").mkdir(parents=True, exist_ok=True)
        os.symlink(data / image, dst / ds / "imagesTr" / f"{case}_0000.nii.gz")
        os.symlink(data / label, dst / ds / "labelsTr" / f"{case}.nii.gz")
    return dst


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (grain workers), if psutil is present."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    procs = [psutil.Process()] + [psutil.Process(c.pid) for c in multiprocessing.active_children()]
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def time_pipeline(cfg: DataConfig, warmup: int, batches: int) -> dict[str, float]:
    """Wall-clock and CPU-time throughput of ``batches`` batches after ``warmup``."""
    it = iter(make_train_dataset(cfg, seed=0, process_index=0, process_count=1))
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    valid, ends = 0, []
    for _ in range(batches):
        valid += int(np.sum(next(it)["valid"]))
        ends.append(time.perf_counter())
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    per_batch = np.diff([t0, *ends])
    vols = batches * cfg.batch_size
    workers = max(1, cfg.num_workers)
    del it
    return {
        "volumes": vols,
        "valid": valid,
        "seconds": round(dt, 3),
        "volumes_per_s": round(vols / dt, 2),
        "volumes_per_s_per_worker": round(vols / dt / workers, 2),
        # The rate above is over the whole window (items differ in cost); the spread of
        # single batches shows how steady it was.
        "batch_seconds": {
            q: round(float(f(per_batch)), 3)
            for q, f in (("min", np.min), ("median", np.median), ("max", np.max))
        },
        # Robust to other load on the machine: volumes per CPU-second spent by the pipeline.
        "volumes_per_cpu_s": round(vols / cpu, 2) if cpu > 0 else None,
    }


def codec_decode_ms(cfg: DataConfig, out: Path, n: int) -> dict[str, dict[str, float]]:
    """Decode time and size of ``n`` records for each shard compression option."""
    res = {}
    options = [
        ("uncompressed", "raw"),
        ("snappy", "raw"),
        ("zstd:1", "raw"),
        ("zstd:3", "raw"),
        ("uncompressed", "zlib"),
    ]
    for comp, codec in options:
        name = f"{comp.replace(':', '')}_{codec}"
        d = out / name
        small = DataConfig(**{**cfg.__dict__, "records": None})
        t0 = time.perf_counter()
        manifest = write_shards(small, d, compression=comp, image_codec=codec)
        write_s = time.perf_counter() - t0
        src = ShardSource(d)
        idx = np.random.default_rng(0).permutation(len(src))[:n]
        for i in idx[:2]:
            src[int(i)]
        t0 = time.perf_counter()
        for i in idx:
            src[int(i)]
        dec = (time.perf_counter() - t0) / len(idx) * 1e3
        size = sum((d / s["file"]).stat().st_size for s in manifest["shards"])
        res[name] = {
            "decode_ms": round(dec, 2),
            "mb_per_record": round(size / max(1, len(src)) / 1e6, 3),
            "write_s": round(write_s, 2),
        }
        shutil.rmtree(d)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--raw-batches", type=int, default=8)
    ap.add_argument("--shard-batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compression", default="zstd:1")
    ap.add_argument("--codecs", action="store_true", help="compare shard compression options")
    ap.add_argument("--tfds", action="store_true", help="also time the TFDS builder's output")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: temporary)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data = shared_root(args.shared) / "data"
    work = Path(args.keep or tempfile.mkdtemp(prefix="sammed3d_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "nifti"
    if not root.exists():
        link_dataset(data, root)
    base = DataConfig(root=str(root), batch_size=args.batch, read_threads=1, prefetch_batches=2)
    result: dict[str, object] = {"cpu_count": os.cpu_count(), "batch_size": args.batch}

    t0 = time.perf_counter()
    index = load_index(base, rebuild=True)
    result["index"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "items": len(index.items),
        "skipped": index.skip_counts(),
        "dropped": dict(index.dropped),
    }
    t0 = time.perf_counter()
    manifest = write_shards(base, work / "shards", compression=args.compression)
    result["convert"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "records": manifest["num_records"],
        "compression": args.compression,
        "mb": round(
            sum((work / "shards" / s["file"]).stat().st_size for s in manifest["shards"]) / 1e6, 1
        ),
    }
    shard_cfg = DataConfig(**{**base.__dict__, "root": None, "records": str(work / "shards")})
    runs = {}
    for name, cfg, n in (
        ("raw", base, args.raw_batches),
        ("shards", shard_cfg, args.shard_batches),
    ):
        # In-process (num_workers=0) is the one-worker figure; N > 1 adds grain's workers.
        for workers in (0, *([args.workers] if args.workers > 1 else [])):
            c = DataConfig(**{**cfg.__dict__, "num_workers": workers})
            runs[f"{name}_workers{max(1, workers)}"] = time_pipeline(c, args.warmup, n)
    if args.tfds:
        from sammed3d_jax.data.tfds_builder import prepare_tfds

        t0 = time.perf_counter()
        tdir = prepare_tfds(base, work / "tfds")
        result["tfds_convert_s"] = round(time.perf_counter() - t0, 2)
        tcfg = DataConfig(**{**base.__dict__, "root": None, "tfds_dir": tdir})
        runs["tfds_workers1"] = time_pipeline(tcfg, args.warmup, args.shard_batches)
    result["pipeline"] = runs

    # Record decode alone (one core): read + CRC + unpack, no augmentation.
    src = ShardSource(work / "shards")
    idx = np.random.default_rng(1).permutation(len(src))[: min(len(src), 40)]
    t0 = time.perf_counter()
    for i in idx:
        src[int(i)]
    result["shard_decode_ms"] = round((time.perf_counter() - t0) / len(idx) * 1e3, 2)
    raw = src.read_bytes(int(idx[0]))
    t0 = time.perf_counter()
    for _ in range(10):
        decode_record(raw)
    result["record_parse_ms"] = round((time.perf_counter() - t0) / 10 * 1e3, 2)
    result["crc32_ms"] = round(min(_timed(lambda: zlib.crc32(raw)) for _ in range(5)) * 1e3, 2)
    if args.codecs:
        result["codecs"] = codec_decode_ms(base, work / "codecs", n=min(len(src), 40))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
