"""Dataset discovery for the nnU-Net and SAM-Med3D folder layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sammed3d_jax.data.layout import Case, LayoutError, discover_cases, scan_dataset


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def _nnunet(root: Path, labels: dict | None = None, ending: str | None = None) -> Path:
    ds = root / "Dataset042_Abdomen"
    ds.mkdir(parents=True)
    meta = {
        "channel_names": {"0": "CT"},
        "labels": labels or {"background": 0, "liver": 1, "aorta": 52},
    }
    if ending:
        meta["file_ending"] = ending
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def test_nnunet_dataset(tmp_path: Path) -> None:
    ds = _nnunet(tmp_path)
    _touch(
        ds,
        "imagesTr/case_002_0000.nii.gz",
        "imagesTr/case_001_0000.nii.gz",
        "imagesTr/bare.nii.gz",  # image without the channel suffix
        "labelsTr/case_001.nii.gz",
        "labelsTr/case_002.nii.gz",
        "labelsTr/bare.nii.gz",
        "labelsTr/orphan.nii.gz",  # label with no image
        "labelsTr/.hidden.nii.gz",
        "labelsTr/notes.txt",
        "imagesTs/test_007_0000.nii.gz",
        "labelsTs/test_007.nii.gz",
        "imagesTs/unlabelled_0000.nii.gz",
    )
    found = scan_dataset(ds)
    assert found.layout == "nnunet"
    assert [(c.split, c.case_id) for c in found.cases] == [
        ("Tr", "bare"),
        ("Tr", "case_001"),
        ("Tr", "case_002"),
        ("Ts", "test_007"),
    ]
    c = found.cases[1]
    assert c == Case(
        "case_001",
        ds / "imagesTr/case_001_0000.nii.gz",
        ds / "labelsTr/case_001.nii.gz",
        {1: "liver", 52: "aorta"},
        "Dataset042_Abdomen",
        "Tr",
    )
    assert found.cases[0].image_path == ds / "imagesTr/bare.nii.gz"
    assert len(found.warnings) == 2
    assert any("orphan.nii.gz" in w and "no image" in w for w in found.warnings)
    assert any("unlabelled_0000.nii.gz" in w and "no label" in w for w in found.warnings)

    with pytest.warns(UserWarning) as record:
        cases = discover_cases(ds)
    assert cases == found.cases
    assert [str(w.message) for w in record] == found.warnings

    relaxed = scan_dataset(ds, require_labels=False)
    unlabelled = [c for c in relaxed.cases if c.case_id == "unlabelled"]
    assert len(unlabelled) == 1 and unlabelled[0].label_path is None


def test_nnunet_file_ending_channels_and_v1_labels(tmp_path: Path) -> None:
    ds = _nnunet(tmp_path, labels={"0": "background", "1": "tumour", "2": "cyst"}, ending=".nii")
    _touch(
        ds,
        "imagesTr/a_0000.nii",
        "imagesTr/a_0001.nii",  # second channel: noted, ignored
        "imagesTr/b_0001.nii",  # no channel 0: skipped
        "labelsTr/a.nii",
        "labelsTr/b.nii",
        "labelsTr/c.nii.gz",  # other extension: not a file of this dataset
    )
    found = scan_dataset(ds, "nnunet")
    assert [c.case_id for c in found.cases] == ["a"]
    assert found.cases[0].class_names == {1: "tumour", 2: "cyst"}
    assert any("extra channels" in w for w in found.warnings)
    assert any("b.nii" in w and "no image" in w for w in found.warnings)


def test_nnunet_region_labels_and_several_datasets(tmp_path: Path) -> None:
    labels = {"background": 0, "edema": 1, "whole": [2, 1], "core": [3], "bad": [0, "x"]}
    ds = _nnunet(tmp_path, labels=labels)
    _touch(ds, "imagesTr/x_0000.nii.gz", "labelsTr/x.nii.gz")
    other = tmp_path / "Dataset007_Other"
    _touch(other, "imagesTr/y.nii.gz", "labelsTr/y.nii.gz")  # no dataset.json
    found = scan_dataset(tmp_path)
    assert [(c.dataset, c.case_id) for c in found.cases] == [
        ("Dataset007_Other", "y"),
        ("Dataset042_Abdomen", "x"),
    ]
    assert found.cases[0].class_names == {}
    assert found.cases[1].class_names == {1: "edema", 3: "core"}  # a one-value region: an id
    assert found.cases[1].class_regions == {"whole": (1, 2)}
    assert found.cases[0].class_regions == {}
    assert any("'bad'" in w and "ignored" in w for w in found.warnings)
    assert not any("whole" in w for w in found.warnings)


def test_sammed3d_layout(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "liver/ct_WORD/imagesTr/word_0025.nii.gz",
        "liver/ct_WORD/labelsTr/word_0025.nii.gz",
        "liver/ct_WORD/labelsTr/word_0099.nii.gz",  # no image
        "adrenal/ct_WORD/imagesTr/word_0025.nii.gz",
        "adrenal/ct_WORD/labelsTr/word_0025.nii.gz",
        "adrenal/mr_AMOS/imagesTr/amos_0001.nii.gz",
        "adrenal/mr_AMOS/labelsTr/amos_0001.nii.gz",
    )
    found = scan_dataset(tmp_path)
    assert found.layout == "sammed3d"
    got = [(c.dataset, c.case_id, c.class_names) for c in found.cases]
    assert got == [
        ("ct_WORD", "word_0025", {1: "adrenal"}),
        ("ct_WORD", "word_0025", {1: "liver"}),
        ("mr_AMOS", "amos_0001", {1: "adrenal"}),
    ]
    assert found.cases[1].label_path == tmp_path / "liver/ct_WORD/labelsTr/word_0025.nii.gz"
    assert found.cases[1].image_path == tmp_path / "liver/ct_WORD/imagesTr/word_0025.nii.gz"
    assert all(c.split == "Tr" for c in found.cases)
    assert len(found.warnings) == 1 and "word_0099" in found.warnings[0]


@pytest.mark.parametrize("layout", ["sammed3d", "nnunet"])
def test_an_image_named_as_its_label_is_not_taken_from_another_case(tmp_path, layout) -> None:
    """Cases ``pat`` and ``pat_0000``, each image named as its label: label ``pat`` must not
    get ``pat_0000``'s image because that name looks like an nnU-Net channel file."""
    ds = tmp_path / "liver" / "ct_X" if layout == "sammed3d" else tmp_path / "Dataset001_X"
    names = ("pat", "pat_0000")
    _touch(ds, *[f"{kind}Tr/{n}.nii.gz" for n in names for kind in ("images", "labels")])
    found = scan_dataset(tmp_path)
    assert found.layout == layout
    pairs = {c.label_path.name: c.image_path.name for c in found.cases}
    assert pairs == {"pat.nii.gz": "pat.nii.gz", "pat_0000.nii.gz": "pat_0000.nii.gz"}
    assert found.warnings == []


def test_both_image_names_for_one_label(tmp_path: Path) -> None:
    """nnU-Net names the image ``<case>_0000``, SAM-Med3D as the label: each layout takes
    its own when a folder holds both, and says so."""
    for layout, root in (("nnunet", "Dataset001_X"), ("sammed3d", "liver/ct_X")):
        ds = tmp_path / layout / root
        _touch(ds, "imagesTr/a.nii.gz", "imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz")
        found = scan_dataset(tmp_path / layout)
        (case,) = found.cases
        want = "a_0000.nii.gz" if layout == "nnunet" else "a.nii.gz"
        assert case.image_path.name == want
        (warning,) = found.warnings
        assert f"using {want}" in warning


def test_nnunet_ignore_label_is_not_a_class(tmp_path: Path) -> None:
    ds = _nnunet(tmp_path, labels={"background": 0, "organ": 1, "ignore": 2})
    _touch(ds, "imagesTr/x_0000.nii.gz", "labelsTr/x.nii.gz")
    found = scan_dataset(tmp_path)
    assert found.cases[0].class_names == {1: "organ"}
    assert any("'ignore' (2) marks unannotated voxels" in w for w in found.warnings)


def test_files_of_another_ending_are_reported(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "liver/ct_A/imagesTr/case1.nii.gz",
        "liver/ct_A/labelsTr/case1.nii.gz",
        "liver/ct_A/imagesTr/case2.nii",
        "liver/ct_A/labelsTr/case2.nii",
    )
    found = scan_dataset(tmp_path)
    assert [c.case_id for c in found.cases] == ["case1"]
    assert sorted(found.warnings) == [
        f"{tmp_path}/liver/ct_A/imagesTr/case2.nii: not a .nii.gz file; skipped",
        f"{tmp_path}/liver/ct_A/labelsTr/case2.nii: not a .nii.gz file; skipped",
    ]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="not found"):
        scan_dataset(tmp_path / "missing")
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(LayoutError, match="not a folder"):
        scan_dataset(file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError, match="no dataset found") as err:
        scan_dataset(empty)
    assert str(empty) in str(err.value)
    only_orphans = tmp_path / "orphans"
    _touch(only_orphans, "labelsTr/a.nii.gz", "imagesTr/readme.md")
    with pytest.raises(LayoutError, match="no usable") as err:
        scan_dataset(only_orphans)
    assert "a.nii.gz" in str(err.value)
    broken = tmp_path / "broken"
    _touch(broken, "imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz")
    (broken / "dataset.json").write_text("{not json")
    with pytest.raises(LayoutError, match=r"dataset\.json"):
        scan_dataset(broken)
    with pytest.raises(ValueError, match="layout"):
        scan_dataset(broken, "bids")  # type: ignore[arg-type]
