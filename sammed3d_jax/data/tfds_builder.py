"""A TFDS builder for the prepared training ROIs, and a grain source over its output.

Measured here with tensorflow-datasets 4.9.10, grain 0.2.18, array-record 0.8.6 and **no
TensorFlow installed**:

* works: ``tfds.core.GeneratorBasedBuilder`` with ``file_format="array_record"``
  (``download_and_prepare`` with ``Tensor``/``Scalar``/``Text`` features, ZLIB-encoded
  tensors, ``MetadataDict``), ``tfds.builder_from_directory`` and
  ``builder.as_data_source()``, whose random-access source decodes examples with numpy and
  pickles into grain workers; ``tensorflow`` is never imported;
* needs TensorFlow: the default ``tfrecord`` file format (``download_and_prepare`` fails in
  the writer with ``No module named 'tensorflow'``) and ``as_dataset()`` (``tf.data``).

So this builder always writes ArrayRecord and is read with :class:`TfdsSource`. It stores
the same prepared ROIs as :mod:`sammed3d_jax.data.records` (record ``i`` = item ``i``, order
kept with ``DatasetInfo(disable_shuffling=True)``) and gives identical training batches, but TFDS's
per-feature protobuf encoding is slower and bigger (the image is float32 so one feature
dtype fits every dataset): for the 116 real ROIs of ``benchmarks/input_pipeline.py`` it
took 74 s to write (shards: 8 s) and fed 36 volumes/s to one worker (shards: 90). The supported, lighter path is
:func:`sammed3d_jax.data.records.write_shards` / ``ShardSource``; this module is for users
who want a TFDS catalogue entry (``dataset_info.json``, ``features.json``).

Usage::

    builder = SamMed3dRois(data_cfg=DataConfig(root=...), data_dir="/data/tfds")
    builder.download_and_prepare()
    DataConfig(tfds_dir=builder.data_dir, ...)  # then make_train_dataset(...)
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from sammed3d_jax.data.records import RecordError, case_works, prepared_case, warn_fixed_index

__all__ = ["SamMed3dRois", "TfdsSource", "prepare_tfds"]

_SPLIT = "train"


class SamMed3dRois(tfds.core.GeneratorBasedBuilder):
    """Prepared ``S³`` ROIs of a NIfTI dataset folder, one example per (case, class) item.

    Args:
      data_cfg: the :class:`~sammed3d_jax.data.pipeline.DataConfig` whose ``root`` is
        converted (items and preprocessing as in the NIfTI pipeline).
      **kwargs: ``tfds.core.GeneratorBasedBuilder`` arguments (``data_dir``, ...);
        ``file_format`` is always ``"array_record"``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Prepared 1.5 mm RAS+ ROIs with binary labels."
    }

    def __init__(self, *, data_cfg: Any = None, index_fingerprint: str = "", **kwargs: Any):
        if data_cfg is None:
            raise ValueError("SamMed3dRois needs data_cfg (read prepared data with TfdsSource)")
        self._data_cfg = data_cfg
        self._index_fingerprint = index_fingerprint
        kwargs["file_format"] = "array_record"
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = int(self._data_cfg.crop_size)
        text, scalar, tensor = tfds.features.Text, tfds.features.Scalar, tfds.features.Tensor
        zlib = tfds.features.Encoding.ZLIB
        return tfds.core.DatasetInfo(
            builder=self,
            description="SAM-Med3D training ROIs: image (raw intensities) and binary label.",
            disable_shuffling=True,  # example i must stay item i
            features=tfds.features.FeaturesDict(
                {
                    "image": tensor(shape=(s, s, s), dtype=np.float32, encoding=zlib),
                    "label": tensor(shape=(s, s, s), dtype=np.uint8, encoding=zlib),
                    "item": scalar(dtype=np.int64),
                    "case_id": text(),
                    "dataset": text(),
                    "class_id": scalar(dtype=np.int64),
                    "class_name": text(),
                    "ct": scalar(dtype=np.bool_),
                    "roi_affine": tensor(shape=(4, 4), dtype=np.float64),
                    "crop_start": tensor(shape=(3,), dtype=np.int64),
                    "spacing": tensor(shape=(3,), dtype=np.float64),
                    "original_shape": tensor(shape=(3,), dtype=np.int64),
                    "original_affine": tensor(shape=(4, 4), dtype=np.float64),
                }
            ),
            metadata=tfds.core.MetadataDict(
                prepare=self._data_cfg.prepare_params(),
                index_params=self._data_cfg.index_params(),
                root=_root_name(self._data_cfg),
                # the source files (paths, sizes, mtimes) the examples were made from
                index_fingerprint=self._index_fingerprint,
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # nothing to download
        return {_SPLIT: self._generate_examples()}

    def _generate_examples(self):
        from sammed3d_jax.data.pipeline import load_index

        index = load_index(self._data_cfg)
        for work in case_works(index, self._data_cfg.prepare_params()):
            for meta, s in prepared_case(work):
                yield (
                    f"{meta['item']:010d}",
                    {
                        "image": np.asarray(s["image"], dtype=np.float32),
                        "label": np.asarray(s["label"], dtype=np.uint8),
                        "item": meta["item"],
                        "case_id": meta["case_id"],
                        "dataset": meta["dataset"],
                        "class_id": meta["class_id"],
                        "class_name": meta["class_name"],
                        "ct": bool(meta["ct"]),
                        "roi_affine": np.asarray(meta["roi_affine"], dtype=np.float64),
                        "crop_start": np.asarray(meta["crop_start"], dtype=np.int64),
                        "spacing": np.asarray(meta["spacing"], dtype=np.float64),
                        "original_shape": np.asarray(meta["original_shape"], dtype=np.int64),
                        "original_affine": np.asarray(meta["original_affine"], dtype=np.float64),
                    },
                )


def prepare_tfds(data_cfg: Any, data_dir: str | os.PathLike) -> str:
    """Build :class:`SamMed3dRois` for ``data_cfg`` under ``data_dir``.

    Returns:
      The dataset version folder, for ``DataConfig(tfds_dir=...)``.
    """
    from sammed3d_jax.data.pipeline import load_index

    fingerprint = load_index(data_cfg).fingerprint
    builder = SamMed3dRois(
        data_cfg=data_cfg, index_fingerprint=fingerprint, data_dir=os.fspath(data_dir)
    )
    builder.download_and_prepare()
    path = os.fspath(builder.data_dir)
    # An existing folder is reused as it is: it must hold this very dataset, made from the
    # same source files (cases added, removed or changed since would go unseen).
    stored = dict(tfds.builder_from_directory(path).info.metadata or {})
    wanted = {
        "prepare": data_cfg.prepare_params(),
        "index_params": data_cfg.index_params(),
        "root": _root_name(data_cfg),
        "index_fingerprint": fingerprint,
    }
    for key in ("root", "index_fingerprint"):  # not recorded by folders written before
        if key not in stored:
            del wanted[key]
    diffs = [
        f"{k}: {stored.get(k)!r} (wanted {v!r})" for k, v in wanted.items() if stored.get(k) != v
    ]
    if diffs:
        raise ValueError(
            f"{path} already holds a dataset prepared differently ({'; '.join(diffs)}); "
            "use another data_dir or delete that folder"
        )
    return path


def _root_name(data_cfg: Any) -> str:
    return os.path.realpath(os.fspath(data_cfg.root)) if data_cfg.root else ""


class TfdsSource:
    """Grain random-access source over a prepared :class:`SamMed3dRois` folder.

    ``source[i]`` is item ``i``'s prepared sample, like
    :class:`~sammed3d_jax.data.records.ShardSource`. The TFDS data source opens lazily in
    each process.

    Args:
      path: the dataset version folder (``.../sam_med3d_rois/1.0.0``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        builder = tfds.builder_from_directory(self.path)
        self.metadata = dict(builder.info.metadata or {})
        self._length = builder.info.splits[_SPLIT].num_examples
        self._source = None

    def __len__(self) -> int:
        return self._length

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def check_compatible(self, cfg: Any) -> None:
        """Raise ValueError if ``cfg``'s crop/resampling settings differ from the data's."""
        stored, wanted = self.metadata.get("prepare"), cfg.prepare_params()
        if stored != wanted:
            raise ValueError(f"{self.path}: prepared with {stored}, config asks for {wanted}")
        warn_fixed_index(self.path, self.metadata.get("index_params"), cfg)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._source is None:
            self._source = tfds.builder_from_directory(self.path).as_data_source(split=_SPLIT)
        index = int(index)
        try:
            ex = self._source[index]
        except Exception as exc:
            raise RecordError(f"{self.path}: example {index} unreadable: {exc}") from exc
        if int(ex["item"]) != index:
            raise RecordError(f"{self.path}: example {index} holds item {int(ex['item'])}")
        return {
            "image": ex["image"],
            "label": ex["label"],
            "affine": np.asarray(ex["roi_affine"], dtype=np.float64),
            "crop_start": np.asarray(ex["crop_start"], dtype=np.int64),
            "ct": bool(ex["ct"]),
            "item": index,
        }
