"""Find image/label cases in a dataset folder.

Two layouts are read:

* **nnU-Net** (``DatasetXXX_Name/``): ``imagesTr/`` and ``labelsTr/`` (also ``Ts``), images
  named ``<case>_0000.nii.gz`` (a bare ``<case>.nii.gz`` is accepted too), labels
  ``<case>.nii.gz``, and an optional ``dataset.json`` whose ``labels`` map (name → id)
  names the classes and whose ``file_ending`` sets the extension. The root may also be a
  folder holding several such datasets.
* **SAM-Med3D** (``<root>/<class>/<dataset>/{imagesTr,labelsTr}/<case>.nii.gz``): every
  label file is binary and the class name is the ``<class>`` folder's name, so
  ``class_names == {1: <class>}``. The same image may appear under several classes; each
  (class, image) pair is its own case.

Problems that affect single files (a label without an image, an image without a label, a
malformed name) are collected as warnings and the file is skipped; problems with the
folder itself (missing, empty, unreadable ``dataset.json``) raise :class:`LayoutError`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

__all__ = ["Case", "Discovery", "LayoutError", "discover_cases", "scan_dataset"]

LayoutName = Literal["auto", "nnunet", "sammed3d"]

_SPLITS = ("Tr", "Ts", "Va", "Val")
_DEFAULT_ENDING = ".nii.gz"
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class LayoutError(ValueError):
    """The dataset folder cannot be read; the message names the folder or file."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One image with its label.

    Attributes:
      case_id: file name without extension (and without nnU-Net's ``_0000`` channel suffix).
      image_path: the image file.
      label_path: the label file (None only with ``require_labels=False``).
      class_names: label value → class name; empty when the dataset does not name them.
      dataset: the dataset folder's name.
      split: ``"Tr"``, ``"Ts"``, ``"Va"`` or ``"Val"``, from the ``images<split>`` folder.
      class_regions: region name → the label values it unites (nnU-Net v2 region entries
        such as KiTS23's ``"kidney": [1, 2, 3]``); empty when there are none.
    """

    case_id: str
    image_path: Path
    label_path: Path | None
    class_names: dict[int, str]
    dataset: str
    split: str
    class_regions: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Discovery:
    """Result of :func:`scan_dataset`: sorted cases plus the files that were skipped."""

    layout: str
    cases: list[Case]
    warnings: list[str]


# --------------------------------------------------------------------------------------


# Volume files of another ending than the dataset's are reported, not silently dropped.
_VOLUME_ENDINGS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


def _visible_files(folder: Path, ending: str) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(ending)
    )


def _split_dirs(folder: Path, kind: str) -> dict[str, Path]:
    return {s: folder / f"{kind}{s}" for s in _SPLITS if (folder / f"{kind}{s}").is_dir()}


def _is_dataset_dir(folder: Path) -> bool:
    return bool(_split_dirs(folder, "images") or _split_dirs(folder, "labels"))


def _read_dataset_json(
    folder: Path, problems: list[str]
) -> tuple[dict[int, str], dict[str, tuple[int, ...]], str]:
    """Class names (id → name, background dropped), regions (name → ids) and file ending
    from ``dataset.json``."""
    path = folder / "dataset.json"
    if not path.is_file():
        return {}, {}, _DEFAULT_ENDING
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path}: cannot read dataset.json ({exc})") from exc
    if not isinstance(meta, dict):
        raise LayoutError(f"{path}: expected a JSON object")
    ending = meta.get("file_ending", _DEFAULT_ENDING)
    if not isinstance(ending, str) or not ending.startswith("."):
        raise LayoutError(f"{path}: invalid file_ending {ending!r}")
    names: dict[int, str] = {}
    regions: dict[str, tuple[int, ...]] = {}
    labels = meta.get("labels", {})
    if not isinstance(labels, dict):
        raise LayoutError(f"{path}: 'labels' must be an object")
    for key, value in labels.items():
        if key == "ignore" and not isinstance(value, bool) and isinstance(value, int):
            # nnU-Net v2: the highest id, for voxels nobody annotated; not a target.
            problems.append(
                f"{path}: label 'ignore' ({value}) marks unannotated voxels: not a class (its "
                "voxels count as background of the other classes)"
            )
        elif isinstance(value, bool):
            problems.append(f"{path}: label {key!r} has a non-integer id {value!r}; ignored")
        elif isinstance(value, int):  # nnU-Net v2: name -> id
            if value != 0:
                names[value] = str(key)
        elif isinstance(value, str) and str(key).isdigit():  # nnU-Net v1: "id" -> name
            if int(key) != 0:
                names[int(key)] = value
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        ):  # nnU-Net v2 region: the union of these label values ("kidney": [1, 2, 3])
            regions[str(key)] = tuple(sorted(set(value)))
        else:
            problems.append(
                f"{path}: label {key!r} -> {value!r} is neither an id nor a list of "
                "positive ids; ignored"
            )
    # A one-value region is that value's class (nnU-Net writes "tumor": [2] or "tumor": 2).
    for key, ids in list(regions.items()):
        if len(ids) == 1 and ids[0] not in names:
            names[ids[0]] = key
            del regions[key]
        elif len(ids) == 1:
            del regions[key]
    return dict(sorted(names.items())), regions, ending


def _stems(folder: Path, ending: str) -> dict[str, Path]:
    """File name without ``ending`` → path, for the visible files of ``folder``."""
    if not folder.is_dir():
        return {}
    return {p.name[: -len(ending)]: p for p in _visible_files(folder, ending)}


def _pair_split(
    dataset_dir: Path,
    split: str,
    ending: str,
    class_names: dict[int, str],
    dataset: str,
    require_labels: bool,
    problems: list[str],
    exact_names_first: bool = False,
) -> list[Case]:
    """Pair labels with images. Pairing is driven by the label names, because a case id may
    itself end in four digits (``word_0025``) and look like a channel suffix.

    When both ``<case>_0000`` and ``<case>`` images exist, the nnU-Net channel file wins,
    unless ``exact_names_first`` (the SAM-Med3D layout names an image as its label) or
    ``<case>_0000`` is the name of another label, whose own image it then is."""
    images_dir = dataset_dir / f"images{split}"
    labels_dir = dataset_dir / f"labels{split}"
    images = _stems(images_dir, ending)
    labels = _stems(labels_dir, ending)
    for folder in (images_dir, labels_dir):
        for other in _visible_files(folder, "") if folder.is_dir() else ():
            name = other.name.lower()
            if name.endswith(_VOLUME_ENDINGS) and not other.name.endswith(ending):
                problems.append(f"{other}: not a {ending} file; skipped")
    used: set[str] = set()
    cases = []
    for case_id, label_path in labels.items():
        channel0, bare = f"{case_id}_0000", case_id
        if channel0 in images and bare in images:
            image_stem = bare if exact_names_first or channel0 in labels else channel0
            other = channel0 if image_stem == bare else bare
            if not (other == channel0 and channel0 in labels):  # else: that label's image
                problems.append(
                    f"{images_dir}: both {channel0}{ending} and {bare}{ending} exist for label "
                    f"{case_id}{ending}; using {image_stem}{ending}"
                )
                used.add(other)
        elif channel0 in images:
            image_stem = channel0
        elif bare in images:
            image_stem = bare
        else:
            problems.append(
                f"{label_path}: label has no image ({images_dir.name}/{channel0}{ending} "
                f"or {bare}{ending}); skipped"
            )
            continue
        used.add(image_stem)
        if image_stem == channel0:
            extra = sorted(
                stem
                for stem in images
                if stem != channel0
                and (m := _CHANNEL_RE.match(stem)) is not None
                and m["case"] == case_id
            )
            if extra:
                used.update(extra)
                problems.append(
                    f"{images_dir}: case {case_id!r} has extra channels {extra}; only _0000 is used"
                )
        image_path = images[image_stem]
        cases.append(Case(case_id, image_path, label_path, dict(class_names), dataset, split))
    for stem in sorted(set(images) - used):
        m = _CHANNEL_RE.match(stem)
        if m is not None and m["channel"] != "0000" and f"{m['case']}_0000" in images:
            continue  # another channel of an unlabelled case, reported with its _0000 file
        if require_labels:
            problems.append(f"{images[stem]}: image has no label in {labels_dir}; skipped")
        else:
            case_id = m["case"] if m is not None and m["channel"] == "0000" else stem
            cases.append(Case(case_id, images[stem], None, dict(class_names), dataset, split))
    return cases


def _scan_nnunet_dataset(
    dataset_dir: Path, require_labels: bool, problems: list[str]
) -> list[Case]:
    class_names, regions, ending = _read_dataset_json(dataset_dir, problems)
    splits = set(_split_dirs(dataset_dir, "images")) | set(_split_dirs(dataset_dir, "labels"))
    cases: list[Case] = []
    for split in sorted(splits):
        cases += _pair_split(
            dataset_dir, split, ending, class_names, dataset_dir.name, require_labels, problems
        )
    if regions:
        cases = [dataclasses.replace(c, class_regions=dict(regions)) for c in cases]
    return cases


def _scan_sammed3d(root: Path, require_labels: bool, problems: list[str]) -> list[Case]:
    cases: list[Case] = []
    for class_dir in _subdirs(root):
        for dataset_dir in _subdirs(class_dir):
            if not _is_dataset_dir(dataset_dir):
                continue
            splits = set(_split_dirs(dataset_dir, "images")) | set(
                _split_dirs(dataset_dir, "labels")
            )
            for split in sorted(splits):
                cases += _pair_split(
                    dataset_dir,
                    split,
                    _DEFAULT_ENDING,
                    {1: class_dir.name},
                    dataset_dir.name,
                    require_labels,
                    problems,
                    exact_names_first=True,
                )
    return cases


def _subdirs(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _detect(root: Path) -> str:
    if _is_dataset_dir(root):
        return "nnunet"
    children = list(_subdirs(root))
    if any(_is_dataset_dir(c) for c in children):
        return "nnunet"
    if any(_is_dataset_dir(g) for c in children for g in _subdirs(c)):
        return "sammed3d"
    raise LayoutError(
        f"{root}: no dataset found (expected imagesTr/labelsTr, "
        "<dataset>/imagesTr/labelsTr or <class>/<dataset>/imagesTr/labelsTr)"
    )


def scan_dataset(
    root: str | Path, layout: LayoutName = "auto", *, require_labels: bool = True
) -> Discovery:
    """Find all cases under ``root``.

    Args:
      root: an nnU-Net dataset folder, a folder of nnU-Net datasets, or a SAM-Med3D root
        (``<class>/<dataset>/{imagesTr,labelsTr}``).
      layout: ``"nnunet"``, ``"sammed3d"`` or ``"auto"`` (detected from the folder tree).
      require_labels: skip (with a warning) images that have no label; with False they
        become cases with ``label_path=None``.

    Returns:
      A :class:`Discovery` with the cases sorted by (dataset, split, case id, label path)
      and a list of human-readable warnings about skipped files.

    Raises:
      LayoutError: ``root`` is missing or not a folder, holds no dataset, holds no usable
        case, or has an unreadable ``dataset.json``.
    """
    root = Path(root)
    if not root.exists():
        raise LayoutError(f"{root}: folder not found")
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    if layout == "auto":
        layout = _detect(root)
    problems: list[str] = []
    if layout == "nnunet":
        dataset_dirs = (
            [root] if _is_dataset_dir(root) else [c for c in _subdirs(root) if _is_dataset_dir(c)]
        )
        if not dataset_dirs:
            raise LayoutError(f"{root}: no nnU-Net dataset (imagesTr/labelsTr) found")
        cases = [c for d in dataset_dirs for c in _scan_nnunet_dataset(d, require_labels, problems)]
    elif layout == "sammed3d":
        cases = _scan_sammed3d(root, require_labels, problems)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if not cases:
        detail = f"; {len(problems)} file(s) skipped: {problems[:3]}" if problems else ""
        raise LayoutError(f"{root}: no usable image/label cases found ({layout} layout){detail}")
    cases.sort(key=lambda c: (c.dataset, c.split, c.case_id, str(c.label_path)))
    return Discovery(layout=layout, cases=cases, warnings=problems)


def discover_cases(
    root: str | Path, layout: LayoutName = "auto", *, require_labels: bool = True
) -> list[Case]:
    """:func:`scan_dataset`, returning only the cases; each skipped file is a ``UserWarning``."""
    found = scan_dataset(root, layout, require_labels=require_labels)
    for message in found.warnings:
        warnings.warn(message, UserWarning, stacklevel=2)
    return found.cases
