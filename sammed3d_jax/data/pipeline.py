"""Training input pipeline: an index of (case, class) items and grain datasets over it.

**Items.** :func:`load_index` scans a dataset folder (nnU-Net or SAM-Med3D layout, see
:mod:`sammed3d_jax.data.layout`) and turns every case into one item per target class: a
class is kept when its voxel count × voxel volume is at least ``min_volume_mm3`` (the
original's data preparation drops < 10 mm³) and when, after resampling, re-orientation and
the crop around it, at least ``min_crop_voxels`` of it remain inside the ``crop_size``³ box
(the original's loader redraws items with ``label.sum() <= 1000``, i.e. keeps ≥ 1001). The
index is built once and stored as JSON together with a fingerprint of the file list (paths,
sizes, mtimes) and of the settings that shape it; a later call reuses it until either
changes. Unusable cases (missing or unreadable file, grid mismatch, NaN, not 3D, empty
label) are skipped, counted per reason and logged; building never raises for one bad case.

**Datasets.** :func:`make_train_dataset` chains grain's dataset API:

    MapDataset.source(items | shard records)
      .shuffle(hash(seed))      # a new permutation every epoch
      .slice(:E)                # E = items rounded down to whole global batches
      .repeat()
      .map_with_index(...)      # load → prepare → ClampCTd → RandFlipd, rng = f(seed, position)
      .slice(p::P)              # batch shard p of P (the process's rows of the batch)
      .batch(B / P)
      .to_iter_dataset(ReadOptions)
      [.mp_prefetch(MultiprocessingOptions)]

Every sample's random numbers come from ``np.random.default_rng([seed, position])``, where
``position`` counts samples over the whole run (all processes), so a sample is the same
whatever the worker or process count. Batching happens before ``to_iter_dataset`` (on the
random-access dataset), so grain's workers each build whole batches and batch ``t`` of
process ``p`` holds positions ``(t·b + j)·P + p``, ``j < b``, with any number of workers
(batching after ``to_iter_dataset`` would group each worker's own elements instead). Epochs
are cut to whole global batches, so one global step never mixes two epochs and the ``P``
processes never see the same item in the same step. The iterator is checkpointable with
``get_state()`` / ``set_state()`` or ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore`` inside an Orbax ``CheckpointManager``. grain starts its workers with
``spawn``: a script using ``num_workers > 0`` needs an ``if __name__ == "__main__":`` guard.

A read error on the NIfTI path at training time yields a zero example with ``valid=False``
(shapes stay static; :func:`read_error_count` counts them per process). Shards
(:mod:`sammed3d_jax.data.records`) raise instead: a damaged shard is a conversion problem,
not a bad scan.

Examples: ``image`` (S, S, S) float32 raw intensities (the train step z-normalises on
device), ``label`` (S, S, S) uint8 {0, 1}, ``item`` int64 item index, ``valid`` bool; batched
with a leading ``B / P`` axis.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import numbers
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from sammed3d_jax.data.geometry import resample_to_spacing, to_canonical
from sammed3d_jax.data.layout import Case, LayoutError, scan_dataset
from sammed3d_jax.data.nifti import VolumeError, align_to_label, load_volume
from sammed3d_jax.data.transforms import (
    CT_RANGE,
    Compose,
    augment_transforms,
    is_ct_name,
    prepare_transforms,
    region_match,
    to_example,
    zero_example,
)
from sammed3d_jax.files import write_atomic

try:  # recent grain releases expose the dataset API at the top level
    import grain

    grain.MapDataset  # noqa: B018
except (ImportError, AttributeError):  # pragma: no cover - older releases
    import grain.python as grain  # type: ignore[no-redef]

__all__ = [
    "DataConfig",
    "Item",
    "ItemIndex",
    "Skip",
    "build_index",
    "epoch_size",
    "load_index",
    "make_eval_dataset",
    "make_train_dataset",
    "open_source",
    "read_error_count",
    "reset_read_error_count",
]

log = logging.getLogger(__name__)

INDEX_FORMAT = "sammed3d_jax.item_index"
INDEX_VERSION = 2  # 2: nnU-Net v2 region entries are classes
_INDEX_PREFIX = ".sammed3d_jax_index"

Match = str  # "equal", "nonzero" or "any:<ids>" (a region class)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input-pipeline settings (defaults reproduce the released model's training data).

    Source (the first one set is used):
      records: folder (or ``manifest.json``) of ArrayRecord shards from
        :func:`sammed3d_jax.data.records.write_shards`.
      tfds_dir: a prepared :mod:`sammed3d_jax.data.tfds_builder` dataset version folder.
      root: NIfTI dataset folder, nnU-Net or SAM-Med3D layout.

    Items (NIfTI path; shards store the result):
      layout: ``"auto"``, ``"nnunet"`` or ``"sammed3d"``.
      splits: which ``images<split>`` folders to use.
      classes: keep only these label ids or class names (None = all).
      min_volume_mm3: a class is used for a case when count × voxel volume ≥ this.
      min_crop_voxels: ... and when ≥ this many of its voxels fall inside the crop
        (1001 = the original's ``label.sum() > 1000``).
      index_path: where to keep the JSON index (default: hidden file in ``root``, else in
        ``~/.cache/sammed3d_jax``).
      index_workers: processes used to build the index (0 = in this process).

    Transforms:
      crop_size: ROI edge ``S``.
      spacing: resampling target in mm.
      resample: False when the files are already at ``spacing`` (the original's
        prepared ``imagesTr_1.5`` data; ``Spacingd`` is skipped).
      canonical: re-orient to RAS+ (True = released weights' regime, False = HEAD).
      clamp_ct: ``"auto"`` (datasets/modalities named ``ct*``), ``"always"``, ``"never"``.
      ct_range: CT clamp range.
      flip_prob: per-axis flip probability (train only).

    Loader:
      batch_size: global batch size (divided among processes).
      eval_batch_size: global eval batch size (None = ``batch_size``).
      num_workers: grain worker processes (0 = in the calling process).
      worker_buffer_size: batches buffered per worker.
      read_threads: threads per process preparing batches (grain ``ReadOptions``).
      prefetch_batches: batches prefetched per process (grain ``ReadOptions``).
      cache_items: keep up to this many prepared (resampled, cropped) NIfTI items in memory
        per process, so small datasets are read and resampled once (0 = no cache; large
        datasets should be converted to shards instead).
    """

    root: str | None = None
    records: str | None = None
    tfds_dir: str | None = None
    layout: str = "auto"
    splits: tuple[str, ...] = ("Tr",)
    classes: tuple[int | str, ...] | None = None
    min_volume_mm3: float = 10.0
    min_crop_voxels: int = 1001
    index_path: str | None = None
    index_workers: int = 0
    crop_size: int = 128
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    resample: bool = True
    canonical: bool = True
    clamp_ct: str = "auto"
    ct_range: tuple[float, float] = CT_RANGE
    flip_prob: float = 0.5
    batch_size: int = 12
    eval_batch_size: int | None = None
    num_workers: int = 0
    worker_buffer_size: int = 1
    read_threads: int = 1
    prefetch_batches: int = 2
    cache_items: int = 0

    def __post_init__(self):
        for name in ("root", "records", "tfds_dir", "index_path"):
            if getattr(self, name) == "":  # config files spell "unset" as ""
                object.__setattr__(self, name, None)
        for name in ("splits", "spacing", "ct_range", "classes"):
            value = getattr(self, name)
            if isinstance(value, str):  # tuple("Tr") would be ("T", "r")
                raise ValueError(f"data.{name} must be a list, got the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        lo_hi = self.ct_range
        if not (
            len(lo_hi) == 2
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in lo_hi)
            and all(np.isfinite(float(v)) for v in lo_hi)
            and lo_hi[0] < lo_hi[1]
        ):
            raise ValueError(f"data.ct_range must be two finite numbers lo < hi, got {lo_hi}")
        if self.clamp_ct not in ("auto", "always", "never"):
            raise ValueError(f"clamp_ct must be 'auto', 'always' or 'never', got {self.clamp_ct!r}")
        if self.crop_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"data.crop_size and data.batch_size must be positive, got "
                f"crop_size={self.crop_size}, batch_size={self.batch_size}"
            )
        for name in ("num_workers", "index_workers", "prefetch_batches", "cache_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{name} must be an integer >= 0, got {value!r}")
        if len(self.spacing) != 3 or not all(
            np.isfinite(float(v)) and float(v) > 0 for v in self.spacing
        ):
            raise ValueError(f"data.spacing must be three positive numbers, got {self.spacing}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DataConfig:
        """Build from a dict / ``ConfigDict``; unknown keys raise ``TypeError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"unknown DataConfig fields: {unknown}")
        return cls(**{k: v for k, v in dict(values).items()})

    def prepare_params(self) -> dict[str, Any]:
        """The settings that determine a prepared ROI (stored in shard manifests)."""
        return {
            "crop_size": int(self.crop_size),
            "spacing": [float(v) for v in self.spacing],
            "resample": bool(self.resample),
            "canonical": bool(self.canonical),
        }

    def index_params(self) -> dict[str, Any]:
        """The settings that determine the item index."""
        return {
            **self.prepare_params(),
            "layout": self.layout,
            "splits": list(self.splits),
            "classes": None if self.classes is None else list(self.classes),
            "min_volume_mm3": float(self.min_volume_mm3),
            "min_crop_voxels": int(self.min_crop_voxels),
        }


# --------------------------------------------------------------------------------------
# Item index
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One training target: a binary class of one case.

    Attributes:
      index: position in the index (= record index in shards).
      case_id, dataset, split: from the dataset layout.
      image, label: file paths, relative to the index root (POSIX separators).
      class_id: label value of the class (1 for SAM-Med3D binary labels; a region's
        smallest value).
      class_name: the class's name (``str(class_id)`` when the dataset names none).
      match: ``"equal"`` (``label == class_id``), ``"nonzero"`` (SAM-Med3D binary files) or
        ``"any:1,2,3"`` (an nnU-Net region: the label values united).
      ct: the dataset or modality is CT (drives the ``"auto"`` clamp).
      volume_mm3: foreground volume in the original file.
      crop_voxels: foreground voxels inside the training crop.
    """

    index: int
    case_id: str
    dataset: str
    split: str
    image: str
    label: str
    class_id: int
    class_name: str
    match: str
    ct: bool
    volume_mm3: float
    crop_voxels: int

    def to_sample(self) -> dict[str, Any]:
        """The input dict of :class:`~sammed3d_jax.data.transforms.LoadImaged`."""
        return {
            "image_path": self.image,
            "label_path": self.label,
            "class_id": self.class_id,
            "match": self.match,
            "ct": self.ct,
            "item": self.index,
        }


@dataclasses.dataclass(frozen=True)
class Skip:
    """A case (or file) left out of the index, with the reason."""

    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ItemIndex:
    """The items of a dataset folder plus what was left out.

    Attributes:
      root: the dataset folder the item paths are relative to.
      items: kept items, in (dataset, split, case, class) order.
      skipped: unusable cases and stray files.
      dropped: number of (case, class) targets removed by each threshold.
      fingerprint: hash of the file list and the index settings.
      path: the JSON file the index was read from or written to (None if not stored).
    """

    root: Path
    items: tuple[Item, ...]
    skipped: tuple[Skip, ...]
    dropped: Mapping[str, int]
    fingerprint: str
    path: Path | None = None

    def skip_counts(self) -> dict[str, int]:
        """Skipped cases per reason category (the text before the first colon)."""
        return dict(collections.Counter(_reason_key(s.reason) for s in self.skipped))

    def summary(self) -> str:
        cases = len({(i.dataset, i.split, i.case_id, i.label) for i in self.items})
        return (
            f"{len(self.items)} items from {cases} cases in {self.root}; "
            f"{len(self.skipped)} skipped {self.skip_counts()}; dropped {dict(self.dropped)}"
        )


def _reason_key(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


def _file_stat(path: Path) -> list[Any]:
    try:
        st = path.stat()
        return [int(st.st_size), int(st.st_mtime_ns)]
    except OSError:
        return [None, None]


def _dataset_dir(case: Case) -> Path:
    return Path(case.label_path or case.image_path).parent.parent


def _dataset_is_ct(dataset_dir: Path, root: Path) -> bool:
    """CT when a folder name below ``root`` is ``ct*`` or ``dataset.json`` says so."""
    names = Path(_rel(dataset_dir, root)).parts if dataset_dir != root else ()
    if any(is_ct_name(n) for n in (*names, dataset_dir.name)):
        return True
    meta = dataset_dir / "dataset.json"
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
            channels = data.get("channel_names", data.get("modality", {}))
            first = channels.get("0") if isinstance(channels, dict) else None
            return isinstance(first, str) and first.strip().lower() == "ct"
        except (OSError, ValueError, AttributeError):
            return False
    return False


@dataclasses.dataclass(frozen=True)
class _CaseJob:
    case: Case
    root: Path
    ct: bool
    layout: str
    params: dict[str, Any]


@dataclasses.dataclass
class _CaseResult:
    items: list[dict[str, Any]]
    skip: str | None
    dropped: collections.Counter


def _integer_label(array: np.ndarray) -> np.ndarray:
    """The label map as a compact non-negative integer array; raises ValueError otherwise."""
    lab = np.asarray(array)
    if lab.dtype == np.bool_:
        return lab.astype(np.uint8)
    if np.issubdtype(lab.dtype, np.floating):
        if not np.array_equal(lab, np.round(lab)):
            raise ValueError("label has non-integer values")
    if lab.size and lab.min() < 0:
        raise ValueError("label has negative values")
    top = int(lab.max()) if lab.size else 0
    if top >= 2**16:
        raise ValueError(f"label values up to {top}; ids above 65535 are not supported")
    return lab.astype(np.uint8 if top < 2**8 else np.uint16, copy=False)


def _analyse_case(job: _CaseJob) -> _CaseResult:
    """Items of one case; never raises (problems become ``skip``)."""
    try:
        return _analyse_case_unchecked(job)
    except Exception as exc:  # one odd case must not stop indexing
        where = job.case.label_path or job.case.image_path
        return _CaseResult(
            [], f"failed: {where}: {type(exc).__name__}: {exc}", collections.Counter()
        )


def _analyse_case_unchecked(job: _CaseJob) -> _CaseResult:
    case, p = job.case, job.params
    dropped: collections.Counter = collections.Counter()
    try:
        if case.label_path is None:
            return _CaseResult([], "no label: the case has no label file", dropped)
        label = load_volume(case.label_path, kind="label")
        image = load_volume(case.image_path, kind="image")
        align_to_label(image, label)  # rejects other shapes
        if job.layout == "sammed3d":
            lab = (np.asarray(label.array) != 0).astype(np.uint8)
            match: Match = "nonzero"
        else:
            lab = _integer_label(label.array)
            match = "equal"
        counts = np.bincount(lab.reshape(-1))
        del image  # read only to reject unusable files
    except VolumeError as exc:
        return _CaseResult([], f"unreadable: {exc}", dropped)
    except (ValueError, OSError, MemoryError) as exc:
        return _CaseResult([], f"invalid label: {case.label_path}: {exc}", dropped)
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    if not present:
        return _CaseResult([], f"empty label: {case.label_path} has no foreground", dropped)
    names = dict(case.class_names)
    # Region classes (nnU-Net v2 entries such as "kidney": [1, 2, 3]) with foreground here.
    regions = {
        name: tuple(v for v in ids if v in present)
        for name, ids in case.class_regions.items()
        if job.layout != "sammed3d"
    }
    regions = {name: ids for name, ids in regions.items() if ids}
    if job.layout != "sammed3d" and (names or regions):
        covered = {v for ids in regions.values() for v in ids}
        unnamed = [v for v in present if v not in names and v not in covered]
        if unnamed:
            dropped["label value not in dataset.json"] += len(unnamed)
        present = [v for v in present if v in names]
    classes = p["classes"]
    if classes is not None:
        wanted = {str(c) for c in classes}
        present = [v for v in present if str(v) in wanted or names.get(v, str(v)) in wanted]
        regions = {name: ids for name, ids in regions.items() if name in wanted}
    voxel_mm3 = float(np.prod(label.spacing))
    # (values, name, match): one label value, or a region's values united.
    targets = []
    kinds = [((v,), names.get(v, str(v)), match) for v in present]
    kinds += [(ids, name, region_match(case.class_regions[name])) for name, ids in regions.items()]
    for ids, name, how in kinds:
        volume = float(sum(int(counts[v]) for v in ids)) * voxel_mm3
        if volume < p["min_volume_mm3"]:
            dropped["volume below min_volume_mm3"] += 1
        else:
            targets.append((ids, name, how, volume))
    if not targets:
        return _CaseResult([], "", dropped)
    # The label on the training grid: nearest resampling copies values, so one pass serves
    # every class (the transforms binarise first; the result is the same).
    grid_lab, affine = lab, label.affine
    if p["resample"]:
        grid_lab, affine = resample_to_spacing(grid_lab, affine, p["spacing"], "nearest")
    if p["canonical"]:
        grid_lab, affine, _ = to_canonical(grid_lab, affine)
    objects = ndimage.find_objects(grid_lab)
    size = np.full(3, int(p["crop_size"]), dtype=np.int64)
    items = []
    for ids, name, how, volume in targets:
        boxes = [objects[v - 1] for v in ids if v - 1 < len(objects) and objects[v - 1]]
        if not boxes:
            dropped["class vanished after resampling"] += 1
            continue
        # The (union's) bounding box, as the original's crop around the binary label.
        lo = np.array([min(b[a].start for b in boxes) for a in range(3)], dtype=np.int64)
        hi = np.array([max(b[a].stop for b in boxes) for a in range(3)], dtype=np.int64)
        start = (lo + hi - size) // 2  # crop_start_from_mask
        window = tuple(
            slice(max(0, int(a)), min(n, int(a + s)))
            for a, s, n in zip(start, size, grid_lab.shape)
        )
        in_crop = int(np.count_nonzero(np.isin(grid_lab[window], ids)))
        if in_crop < p["min_crop_voxels"]:
            dropped["crop below min_crop_voxels"] += 1
            continue
        items.append(
            {
                "case_id": case.case_id,
                "dataset": case.dataset,
                "split": case.split,
                "image": _rel(case.image_path, job.root),
                "label": _rel(case.label_path, job.root),
                "class_id": int(ids[0]),
                "class_name": name,
                "match": how,
                "ct": bool(job.ct),
                "volume_mm3": volume,
                "crop_voxels": in_crop,
            }
        )
    return _CaseResult(items, None, dropped)


def _discover(cfg: DataConfig, root: Path) -> tuple[str, list[Case], list[Skip]]:
    found = scan_dataset(root, cfg.layout)  # type: ignore[arg-type]
    cases = [c for c in found.cases if c.split in cfg.splits]
    skips = [Skip(_warning_path(w), f"layout: {w}") for w in found.warnings]
    return found.layout, cases, skips


def _warning_path(message: str) -> str:
    return message.split(": ", 1)[0]


def _fingerprint(cfg: DataConfig, root: Path, layout: str, cases: Sequence[Case]) -> str:
    files = []
    for c in cases:
        for path in (c.image_path, c.label_path):
            if path is not None:
                files.append([_rel(path, root), *_file_stat(path)])
    metas = sorted({_dataset_dir(c) / "dataset.json" for c in cases})
    for m in metas:
        if m.is_file():
            files.append([_rel(m, root), *_file_stat(m)])
    payload = {
        "version": INDEX_VERSION,
        "params": cfg.index_params(),
        "layout": layout,
        "files": files,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _default_index_path(cfg: DataConfig, root: Path) -> Path:
    if cfg.index_path is not None:
        return Path(cfg.index_path)
    params = json.dumps(cfg.index_params(), sort_keys=True).encode()
    name = f"{_INDEX_PREFIX}-{hashlib.sha256(params).hexdigest()[:12]}.json"
    if os.access(root, os.W_OK):
        return root / name
    tag = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:12]
    return Path.home() / ".cache" / "sammed3d_jax" / f"{tag}{name}"


def build_index(cfg: DataConfig, root: str | Path | None = None) -> ItemIndex:
    """Scan ``root`` (default ``cfg.root``) and analyse every case; nothing is stored.

    Reads every label (and image, to reject unusable ones) once; with
    ``cfg.index_workers > 0`` cases are analysed in that many processes.

    Raises:
      LayoutError: the folder holds no dataset at all (single bad cases never raise).
    """
    root = Path(root if root is not None else _require(cfg.root, "root"))
    layout, cases, skips = _discover(cfg, root)
    return _build(cfg, root, layout, cases, skips, _fingerprint(cfg, root, layout, cases))


def _build(cfg, root, layout, cases, skips, fingerprint) -> ItemIndex:
    ct_by_dir: dict[Path, bool] = {}
    jobs = []
    params = cfg.index_params()
    for c in cases:
        d = _dataset_dir(c)
        if d not in ct_by_dir:
            ct_by_dir[d] = _dataset_is_ct(d, root)
        jobs.append(_CaseJob(c, root, ct_by_dir[d], layout, params))
    if cfg.index_workers > 0 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(cfg.index_workers, mp_context=ctx) as pool:
            results = list(pool.map(_analyse_case, jobs, chunksize=1))
    else:
        results = [_analyse_case(j) for j in jobs]
    items: list[Item] = []
    dropped: collections.Counter = collections.Counter()
    skipped = list(skips)
    for job, res in zip(jobs, results):
        dropped.update(res.dropped)
        if res.skip:
            skipped.append(Skip(str(job.case.label_path or job.case.image_path), res.skip))
        for fields in res.items:
            items.append(Item(index=len(items), **fields))
    for s in skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    index = ItemIndex(root, tuple(items), tuple(skipped), dict(dropped), fingerprint)
    log.info("item index: %s", index.summary())
    return index


def _index_to_json(index: ItemIndex, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "fingerprint": index.fingerprint,
        "params": params,
        "root": str(index.root),
        "items": [dataclasses.asdict(i) for i in index.items],
        "skipped": [[s.path, s.reason] for s in index.skipped],
        "dropped": dict(index.dropped),
    }


def _index_from_json(data: Mapping[str, Any], root: Path, path: Path) -> ItemIndex:
    items = tuple(Item(**i) for i in data["items"])
    skipped = tuple(Skip(p, r) for p, r in data["skipped"])
    return ItemIndex(root, items, skipped, dict(data["dropped"]), data["fingerprint"], path)


def _write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data))


def load_index(
    cfg: DataConfig, root: str | Path | None = None, *, rebuild: bool = False
) -> ItemIndex:
    """The item index of ``root`` (default ``cfg.root``): reused from JSON or built and stored.

    The stored index is reused when its fingerprint (file paths, sizes and mtimes, the
    ``dataset.json`` files, and the index settings of ``cfg``) matches; otherwise it is
    rebuilt and rewritten atomically. An unwritable location only costs the reuse.
    """
    root = Path(root if root is not None else _require(cfg.root, "root"))
    layout, cases, skips = _discover(cfg, root)
    fingerprint = _fingerprint(cfg, root, layout, cases)
    path = _default_index_path(cfg, root)
    if not rebuild and path.is_file():
        try:
            data = json.loads(path.read_text())
            if (
                data.get("format") == INDEX_FORMAT
                and data.get("version") == INDEX_VERSION
                and data.get("fingerprint") == fingerprint
            ):
                index = _index_from_json(data, root, path)
                log.info("item index reused from %s: %s", path, index.summary())
                return index
            log.info("item index %s is stale; rebuilding", path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("item index %s unreadable (%s); rebuilding", path, exc)
    index = _build(cfg, root, layout, cases, skips, fingerprint)
    try:
        _write_json_atomic(path, _index_to_json(index, cfg.index_params()))
        index = dataclasses.replace(index, path=path)
    except OSError as exc:
        log.warning("could not store the item index at %s: %s", path, exc)
    return index


def _require(value: str | None, name: str) -> str:
    if value is None:
        raise ValueError(f"DataConfig.{name} is not set")
    return value


# --------------------------------------------------------------------------------------
# Example construction
# --------------------------------------------------------------------------------------


class _ReadErrors:
    """Per-process count of examples replaced by zeros after a read error."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1


_READ_ERRORS = _ReadErrors()


def read_error_count() -> int:
    """Examples replaced by ``valid=False`` zeros in this process (workers count their own)."""
    return _READ_ERRORS.count


def reset_read_error_count() -> None:
    with _READ_ERRORS._lock:
        _READ_ERRORS.count = 0


class _Padding:
    """Marker element of the eval padding."""

    def __eq__(self, other):
        return isinstance(other, _Padding)

    def __hash__(self):
        return 0


class _PaddedSource:
    """``source`` followed by padding markers up to ``length`` (random access)."""

    def __init__(self, source: Sequence[Any], length: int):
        self._source, self._n, self._length = source, len(source), int(length)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        return self._source[index] if index < self._n else _Padding()


class _Subset:
    """The elements of ``source`` at ``indices`` (random access)."""

    def __init__(self, source: Sequence[Any], indices: np.ndarray):
        self._source, self._indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._source[self._indices[index]]


def _rng(seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**64, int(position)])


class ExampleMap:
    """``(position, element) -> example``: prepare (NIfTI items) or take a decoded record,
    then augment with a generator seeded by ``(seed, position)``.

    Args:
      crop_size: ROI edge (for zero examples).
      prepare: the prepare chain for :class:`Item` elements (None when the source already
        yields prepared samples, as shard sources do).
      augment: the per-step chain (ClampCTd [→ RandFlipd]).
      seed: the run seed (None: no random transforms allowed).
    """

    def __init__(
        self,
        crop_size: int,
        prepare: Compose | None,
        augment: Compose,
        seed: int | None,
        cache_items: int = 0,
    ):
        self.crop_size, self.prepare, self.augment, self.seed = crop_size, prepare, augment, seed
        self.cache_items = int(cache_items)
        self._cache: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get a copy without the lock and with an empty cache of their own.
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_cache"] = collections.OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _prepared(self, element: Item) -> dict[str, Any]:
        if self.cache_items <= 0:
            return self.prepare(element.to_sample())
        with self._lock:
            hit = self._cache.get(element.index)
            if hit is not None:
                self._cache.move_to_end(element.index)
        if hit is None:
            hit = self.prepare(element.to_sample())
            with self._lock:
                self._cache[element.index] = hit
                while len(self._cache) > self.cache_items:
                    self._cache.popitem(last=False)
        # Transforms may modify arrays in place: hand out copies.
        return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in hit.items()}

    def __call__(self, position: int, element: Any) -> dict[str, np.ndarray]:
        if isinstance(element, _Padding):
            return zero_example(self.crop_size, -1)
        if isinstance(element, Item):
            try:
                sample = self._prepared(element)
            except Exception as exc:  # a bad file must not stop training
                _READ_ERRORS.add()
                log.warning(
                    "item %d (%s) unreadable, using zeros: %s", element.index, element.label, exc
                )
                return zero_example(self.crop_size, element.index)
        else:
            sample = element
        rng = None if self.seed is None else _rng(self.seed, position)
        sample = self.augment(sample, rng)
        return to_example(sample, int(sample["item"]))


def open_source(cfg: DataConfig) -> tuple[Sequence[Any], Compose | None]:
    """The random-access source the config points to, and the prepare chain it needs.

    Returns:
      ``(source, prepare)``: for shards/tfds a source of prepared samples and None; for a
      NIfTI folder the tuple of :class:`Item` and the prepare chain.
    """
    if cfg.records is not None:
        from sammed3d_jax.data.records import ShardSource

        src = ShardSource(cfg.records)
        src.check_compatible(cfg)
        return src, None
    if cfg.tfds_dir is not None:
        from sammed3d_jax.data.tfds_builder import TfdsSource

        src = TfdsSource(cfg.tfds_dir)
        src.check_compatible(cfg)
        return src, None
    index = load_index(cfg)
    if not index.items:
        raise LayoutError(f"{index.root}: no training items ({index.summary()})")
    prepare = prepare_transforms(
        cfg.crop_size, cfg.spacing, cfg.resample, cfg.canonical, root=index.root
    )
    return index.items, prepare


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _source_name(cfg: DataConfig) -> str:
    return str(cfg.records or cfg.tfds_dir or cfg.root)


def _shuffle_seed(seed: int) -> int:
    """grain's shuffle seed, hashed from the run seed.

    grain orders epoch k with seed + k, so passing the run seed itself would make seed s + 1
    replay seed s's second epoch first (correlated seed sweeps); it also needs [0, 2^32).
    """
    return int(np.random.SeedSequence([int(seed) % 2**64, 1]).generate_state(1)[0])


def epoch_size(num_items: int, global_batch: int) -> int:
    """Samples per epoch: ``num_items`` rounded down to whole global batches (all of them
    when there are fewer items than one batch)."""
    return num_items - num_items % global_batch if num_items >= global_batch else num_items


def _per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} is not divisible by the process count {process_count}"
        )
    return global_batch // process_count


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``absl.app`` nobody parses them."""
    try:
        from absl import flags
    except ImportError:  # pragma: no cover - grain depends on absl
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _finish(ds: grain.MapDataset, cfg: DataConfig) -> grain.IterDataset:
    read = grain.ReadOptions(
        num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches
    )
    it = ds.to_iter_dataset(read)
    if cfg.num_workers > 0:
        _ensure_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return it


def make_train_dataset(
    cfg: DataConfig,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start_batch: int = 0,
    opened: tuple[Sequence[Any], Compose | None] | None = None,
) -> grain.IterDataset:
    """The infinite, shuffled, augmented training stream of this process.

    Args:
      cfg: pipeline settings (source, transforms, batch size, workers).
      seed: run seed: shuffle order and augmentation.
      process_index, process_count: this process's shard (default ``jax.process_index()``
        and ``jax.process_count()``).
      start_batch: global batch index to start from. The stream is a pure function of
        (seed, global batch index), so a run resumes at the same data with any number of
        processes by passing the number of batches already consumed.
      opened: ``open_source(cfg)``'s result when the caller already has it.

    Returns:
      A grain ``IterDataset`` of batches ``{"image": (b, S, S, S) float32, "label":
      (b, S, S, S) uint8, "item": (b,) int64, "valid": (b,) bool}`` with
      ``b = cfg.batch_size / process_count``; ``iter()`` gives a checkpointable iterator.
    """
    pi, pc = _process(process_index, process_count)
    b = _per_process_batch(cfg.batch_size, pc)
    source, prepare = opened if opened is not None else open_source(cfg)
    n = len(source)
    if n == 0:
        raise LayoutError(f"{_source_name(cfg)}: no training records")
    epoch = epoch_size(n, cfg.batch_size)
    if n < cfg.batch_size:
        log.warning("%d items < global batch %d: batches repeat items", n, cfg.batch_size)
    augment = augment_transforms(cfg.clamp_ct, cfg.ct_range, cfg.flip_prob)  # type: ignore[arg-type]
    ds = grain.MapDataset.source(source).shuffle(_shuffle_seed(seed))
    if epoch < n:
        ds = ds.slice(slice(0, epoch))  # slices are per epoch: a fresh permutation each time
    ds = ds.repeat()
    # Mapping before the process slice keys each sample's rng by its global position; the
    # dataset is lazy, so a process only prepares its own positions.
    ds = ds.map_with_index(ExampleMap(cfg.crop_size, prepare, augment, seed, cfg.cache_items))
    ds = ds.slice(slice(pi, None, pc))
    ds = ds.batch(b, drop_remainder=True)
    if start_batch:
        ds = ds.slice(slice(int(start_batch), None))
    return _finish(ds, cfg)


def make_eval_dataset(
    cfg: DataConfig,
    process_index: int | None = None,
    process_count: int | None = None,
    max_items: int = 0,
) -> grain.IterDataset:
    """One deterministic pass over all items: no shuffle, no flips, padded last batch.

    The item list is padded to whole global batches with zero examples (``valid=False``,
    ``item=-1``) so every process yields the same number of equally shaped batches; process
    ``p`` takes items ``p, p + P, ...``. CT clamping follows ``cfg.clamp_ct``.

    Args:
      max_items: when > 0 and below the number of items, a fixed sample of that many items
        drawn uniformly over the whole list (the same one on every call), not its first
        items: those would come from the first datasets / classes of a sorted list only.

    Returns:
      A finite grain ``IterDataset`` of batches shaped like :func:`make_train_dataset`'s.
    """
    pi, pc = _process(process_index, process_count)
    global_batch = cfg.eval_batch_size or cfg.batch_size
    b = _per_process_batch(global_batch, pc)
    source, prepare = open_source(cfg)
    if len(source) == 0:
        raise LayoutError(f"{_source_name(cfg)}: no evaluation records")
    if 0 < max_items < len(source):
        picked = np.random.default_rng(0).choice(len(source), int(max_items), replace=False)
        source = _Subset(source, np.sort(picked))  # in list order: a case's items stay adjacent
    total = math.ceil(len(source) / global_batch) * global_batch
    augment = augment_transforms(cfg.clamp_ct, cfg.ct_range, flip_prob=0.0)  # type: ignore[arg-type]
    ds = grain.MapDataset.source(_PaddedSource(source, total))
    ds = ds.map_with_index(ExampleMap(cfg.crop_size, prepare, augment, None, cfg.cache_items))
    ds = ds.slice(slice(pi, None, pc))
    ds = ds.batch(b, drop_remainder=True)
    return _finish(ds, cfg)
