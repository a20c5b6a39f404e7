"""``evaluate.py``: outputs, both layouts, resume, bad cases, CLI errors, real volumes."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.checkpoint import load_model
from sammed3d_jax.eval import runner
from sammed3d_jax.eval.runner import evaluate_dataset, main

REPO = Path(__file__).resolve().parents[2]
CKPT = REPO / "tests" / "fixtures" / "golden_small" / "checkpoint_train_format.pth"


@pytest.fixture(scope="module")
def golden_model():
    return load_model(CKPT)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def _save(path: Path, array: np.ndarray, like: nib.Nifti1Image | None = None, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if like is not None:
        img = nib.Nifti1Image(array, like.affine, like.header)
        img.set_data_dtype(array.dtype)
    else:
        img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def fixture_dataset(tmp_path_factory, fixtures_dir):
    """nnU-Net layout: the t2 case (4 classes) and a second case with classes 2 and 4."""
    root = tmp_path_factory.mktemp("data") / "Dataset001_Cord"
    d = fixtures_dir / "preprocess"
    _link(d / "t2.nii.gz", root / "imagesTr" / "cord_a_0000.nii.gz")
    _link(d / "t2_seg-manual_labeled.nii.gz", root / "labelsTr" / "cord_a.nii.gz")
    _link(d / "t2.nii.gz", root / "imagesTr" / "cord_b_0000.nii.gz")
    lab = nib.load(d / "t2_seg-manual_labeled.nii.gz")
    arr = np.asarray(lab.dataobj)
    _save(root / "labelsTr" / "cord_b.nii.gz", np.where(np.isin(arr, [2, 4]), arr, 0), lab)
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "C2": 2, "C3": 3, "C4": 4, "C5": 5}})
    )
    return root


def _check_outputs(out: Path, protocol: str, n_clicks: int, n_cases: int, predictions: bool):
    summary = json.loads((out / "summary.json").read_text())
    for key in ("settings", "metric_per_case", "mean", "foreground_mean", "pooled_mean", "failed"):
        assert key in summary
    assert summary["settings"]["protocol"] == protocol
    assert summary["settings"]["num_clicks"] == n_clicks
    assert summary["num_ok"] == n_cases and summary["failed"] == []
    assert len(summary["metric_per_case"]) == n_cases
    for record in summary["metric_per_case"]:
        assert set(record["timings"]) >= {"load_s", "preprocess_s", "total_s"}
        label = nib.load(record["label"])
        classes = sorted(int(c) for c in np.unique(np.asarray(label.dataobj)) if c != 0)
        assert sorted(int(c) for c in record["classes"]) == classes
        for res in record["classes"].values():
            assert len(res["dice"]) == len(res["nsd"]) == n_clicks
            for v in res["dice"] + res["nsd"]:
                assert 0.0 <= v <= 1.0
            assert res["dice_final"] == res["dice"][-1]
            assert 1 <= len(res["clicks"]) <= n_clicks
            for k, click in enumerate(res["clicks"]):
                assert click["label"] in (0, 1)
                assert click["step"] >= k + 1
                if click["point"] is not None:
                    assert all(0 <= p < s for p, s in zip(click["point"], label.shape))
            if protocol == "sammed3d":  # the first click is a foreground voxel
                first = res["clicks"][0]["point"]
                assert first is None or res["clicks"][0]["label"] == 1
        if protocol == "cvpr25":
            level = record["image_level"]
            assert len(level["dsc"]) == len(level["nsd"]) == n_clicks
            assert all(0.0 <= v <= 1.0 for v in level["dsc"] + level["nsd"])
            if n_clicks >= 2:
                assert 0.0 <= level["dsc_auc"] <= n_clicks - 1
        if predictions:
            pred = nib.load(out / record["prediction"])
            assert pred.shape == label.shape
            np.testing.assert_array_equal(pred.affine, label.affine)
            assert set(np.unique(np.asarray(pred.dataobj))) <= {0, *classes}
    if protocol == "cvpr25":
        assert "image_level_mean" in summary
    fg = summary["foreground_mean"]
    assert len(fg["dice"]) == n_clicks
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == sum(len(r["classes"]) for r in summary["metric_per_case"])
    assert {f"dice_{n_clicks}", f"nsd_{n_clicks}", "dice_final"} <= set(rows[0])
    # The original's "overall": mean and population std over every (case, class) value.
    finals = [float(r["dice_final"]) for r in rows if r["status"] == "ok" and r["dice_final"]]
    pooled = summary["pooled_mean"]
    assert pooled["dice_final"] == pytest.approx(np.mean(finals), abs=1e-5)
    assert pooled["dice_final_std"] == pytest.approx(np.std(finals), abs=1e-5)
    for name, m in summary["mean"].items():
        values = [
            float(r["dice_final"])
            for r in rows
            if (r["class_name"] or r["class_id"]) == name and r["dice_final"]
        ]
        assert m["dice_final_std"] == pytest.approx(np.std(values), abs=1e-5)
        assert len(m["dice_std"]) == n_clicks
    assert (out / "dice_vs_clicks.png").stat().st_size > 1000
    assert len(list((out / "cases").glob("*.json"))) == n_cases
    assert not list(out.rglob(".*"))  # no temporary files left
    return summary


@pytest.mark.parametrize("protocol", ["sammed3d", "cvpr25"])
def test_both_protocols_offline(protocol, fixture_dataset, golden_model, tmp_path):
    out = tmp_path / "out"
    stats = evaluate_dataset(
        fixture_dataset,
        CKPT,
        out,
        protocol=protocol,
        num_clicks=2,
        save_predictions=True,
        progress=False,
        model=golden_model,
    )
    assert stats.computed == ["cord_a", "cord_b"] and stats.skipped == []
    summary = _check_outputs(out, protocol, 2, 2, predictions=True)
    assert set(summary["mean"]) == {"C2", "C3", "C4", "C5"}
    assert summary["mean"]["C2"]["n"] == 2 and summary["mean"]["C3"]["n"] == 1


def test_cli_with_converted_checkpoint_and_sammed3d_layout(
    fixture_dataset, golden_model, tmp_path, capsys
):
    """SAM-Med3D layout (binary labels, class = folder), --classes, and a converted checkpoint."""
    from sammed3d_jax.checkpoint import save_model

    ckpt_dir = save_model(golden_model, tmp_path / "ckpt")
    root = tmp_path / "sam"
    src = fixture_dataset / "labelsTr" / "cord_a.nii.gz"
    lab = nib.load(src)
    arr = np.asarray(lab.dataobj)
    for organ, value in (("c3_segment", 3), ("c4_segment", 4)):
        base = root / organ / "sct_t2"
        _link(fixture_dataset / "imagesTr" / "cord_a_0000.nii.gz", base / "imagesTr" / "t2.nii.gz")
        _save(base / "labelsTr" / "t2.nii.gz", (arr == value).astype(np.uint8), lab)
    out = tmp_path / "out"
    argv = ["--data", str(root), "--checkpoint", str(ckpt_dir), "--out", str(out)]
    assert main([*argv, "--clicks", "1", "--no-progress", "--classes", "1"]) == 0
    captured = capsys.readouterr()
    assert "2 case(s) ok" in captured.out
    assert "--classes with the sammed3d protocol" in captured.err
    summary = _check_outputs(out, "sammed3d", 1, 2, predictions=False)
    assert summary["settings"]["layout"] == "sammed3d"
    assert set(summary["mean"]) == {"c3_segment", "c4_segment"}
    keys = [r["case"] for r in summary["metric_per_case"]]
    assert len(set(keys)) == 2 and all("t2" in k for k in keys)


def test_resume(fixture_dataset, golden_model, tmp_path, fixtures_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(fixture_dataset, data / "Dataset001_Cord")
    # A third case so that --limit leaves work to do.
    extra = data / "Dataset002_More"
    _link(fixtures_dir / "preprocess" / "t2.nii.gz", extra / "imagesTr" / "cord_c_0000.nii.gz")
    _link(fixture_dataset / "labelsTr" / "cord_b.nii.gz", extra / "labelsTr" / "cord_c.nii.gz")
    out = tmp_path / "out"
    kwargs = dict(protocol="cvpr25", num_clicks=2, progress=False, model=golden_model)

    first = evaluate_dataset(data, CKPT, out, limit=2, **kwargs)
    assert first.computed == ["cord_a", "cord_b"]
    summary_2 = (out / "summary.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json")}

    # Re-running a finished run recomputes nothing and rebuilds the identical summary.
    again = evaluate_dataset(data, CKPT, out, limit=2, **kwargs)
    assert again.computed == [] and again.skipped == ["cord_a", "cord_b"]
    assert (out / "summary.json").read_bytes() == summary_2

    # A run killed during cord_b: its case file is missing and a temporary file is left.
    kept = json.loads((out / "cases" / "cord_b.json").read_text())
    (out / "cases" / "cord_b.json").unlink()
    (out / "cases" / ".cord_b.json.tmp123.tmp").write_text("{partial")
    resumed = evaluate_dataset(data, CKPT, out, **kwargs)
    assert resumed.computed == ["cord_b", "cord_c"] and resumed.skipped == ["cord_a"]
    assert (out / "cases" / "cord_a.json").stat().st_mtime_ns == mtimes["cord_a.json"]
    redone = json.loads((out / "cases" / "cord_b.json").read_text())
    for key in ("classes", "image_level"):
        assert redone[key] == kept[key]  # deterministic: same clicks and metrics
    summary = json.loads((out / "summary.json").read_text())
    assert [r["case"] for r in summary["metric_per_case"]] == ["cord_a", "cord_b", "cord_c"]

    # A case file missing what the summary reads (older schema, edited by hand) is
    # reported and computed again instead of breaking the summary.
    broken = json.loads((out / "cases" / "cord_c.json").read_text())
    del broken["classes"][next(iter(broken["classes"]))]["dice_final"]
    (out / "cases" / "cord_c.json").write_text(json.dumps(broken))
    fixed = evaluate_dataset(data, CKPT, out, **kwargs)
    assert fixed.computed == ["cord_c"]
    assert "incomplete case file" in capsys.readouterr().err
    for key in ("timings", "dataset"):  # read by the summary and its CSV
        broken = json.loads((out / "cases" / "cord_c.json").read_text())
        del broken[key]
        (out / "cases" / "cord_c.json").write_text(json.dumps(broken))
        assert evaluate_dataset(data, CKPT, out, **kwargs).computed == ["cord_c"], key
        assert "incomplete case file" in capsys.readouterr().err
    # A case file of other image/label files (the dataset changed under the same key) is
    # not reused either.
    moved = json.loads((out / "cases" / "cord_a.json").read_text())
    moved["image"] = moved["image"] + ".old"
    (out / "cases" / "cord_a.json").write_text(json.dumps(moved))
    assert evaluate_dataset(data, CKPT, out, **kwargs).computed == ["cord_a"]

    # An input file changed in place since its case was evaluated: computed again.
    label_c = extra / "labelsTr" / "cord_c.nii.gz"
    blob = label_c.read_bytes()
    label_c.unlink()
    label_c.write_bytes(blob)
    assert evaluate_dataset(data, CKPT, out, **kwargs).computed == ["cord_c"]
    assert "changed since they were evaluated are computed again: cord_c" in capsys.readouterr().err

    # The model is not even needed once everything is done.
    final = (out / "summary.json").read_bytes()
    done = evaluate_dataset(data, CKPT, out, protocol="cvpr25", num_clicks=2, progress=False)
    assert done.computed == [] and (out / "summary.json").read_bytes() == final

    # Other settings in the same folder are refused.
    with pytest.raises(runner.RunnerError, match="other settings"):
        evaluate_dataset(data, CKPT, out, protocol="cvpr25", num_clicks=3, progress=False)


def test_other_weights_at_the_same_path_are_refused(fixture_dataset, golden_model, tmp_path):
    """A checkpoint replaced in place (or a training run with a newer step) gives other
    results: they are not mixed into a folder of the previous weights' results."""
    ckpt = tmp_path / "model.pth"
    shutil.copy(CKPT, ckpt)
    out = tmp_path / "out"
    kwargs = dict(num_clicks=1, limit=1, progress=False, model=golden_model)
    evaluate_dataset(fixture_dataset, ckpt, out, **kwargs)
    assert evaluate_dataset(fixture_dataset, ckpt, out, **kwargs).computed == []
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(runner.RunnerError, match="other settings \\(weights "):
        evaluate_dataset(fixture_dataset, ckpt, out, **kwargs)


def test_odd_names_reach_every_output(fixture_dataset, golden_model, tmp_path):
    """A folder name that is not UTF-8 and class names matplotlib would read as mathtext."""
    root = tmp_path / ("d" + os.fsdecode(b"\xff")) / ("Dataset001_" + os.fsdecode(b"\xff") + "$^$")
    root.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).symlink_to(fixture_dataset / sub)
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "C$^$2": 2, "C3$": 3, "C4": 4, "C5": 5}})
    )
    out = tmp_path / "out"
    stats = evaluate_dataset(
        root.parent, CKPT, out, num_clicks=1, limit=1, progress=False, model=golden_model
    )
    assert stats.computed == ["cord_a"]
    assert b"\xff$^$" in (out / "summary.csv").read_bytes()
    assert "C$^$2" in json.loads((out / "summary.json").read_text())["mean"]
    assert (out / "dice_vs_clicks.png").stat().st_size > 1000


def test_plot_text_is_shown_literally():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sammed3d_jax.inference.overlay import plain_text

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = ["_bladder", "a$^$b", "x" + os.fsdecode(b"\xff")]
    for name in names:
        ax.plot([0, 1], [0, 1], label=plain_text(name))
    texts = [t.get_text() for t in ax.legend().get_texts()]
    assert texts == ["\u200b_bladder", r"a\$^\$b", "x\ufffd"]  # none hidden or mangled
    fig.savefig(io.BytesIO(), format="png")


def test_results_are_not_written_into_the_inputs(fixture_dataset, golden_model, tmp_path):
    kwargs = dict(num_clicks=1, limit=1, progress=False, model=golden_model)
    ckpt = tmp_path / "run"
    (ckpt / "checkpoints").mkdir(parents=True)
    for out, flag in ((fixture_dataset, "--data"), (ckpt / "eval", "--checkpoint")):
        with pytest.raises(runner.RunnerError, match=f"inside the {flag} folder"):
            evaluate_dataset(fixture_dataset, ckpt, out, **kwargs)
    assert not (fixture_dataset / "run.json").exists() and not (ckpt / "eval").exists()


def test_resume_recomputes_a_deleted_prediction(fixture_dataset, golden_model, tmp_path):
    out = tmp_path / "out"
    kwargs = dict(num_clicks=1, limit=1, save_predictions=True, progress=False, model=golden_model)
    first = evaluate_dataset(fixture_dataset, CKPT, out, **kwargs)
    (saved,) = (out / "predictions").iterdir()
    again = evaluate_dataset(fixture_dataset, CKPT, out, **kwargs)
    assert again.computed == [] and again.skipped == first.computed
    saved.unlink()
    redone = evaluate_dataset(fixture_dataset, CKPT, out, **kwargs)
    assert redone.computed == first.computed and saved.exists()


def test_bad_cases_are_recorded_and_the_run_goes_on(fixture_dataset, golden_model, tmp_path):
    root = tmp_path / "Dataset009_Bad"
    images, labels = root / "imagesTr", root / "labelsTr"
    _link(fixture_dataset / "imagesTr" / "cord_a_0000.nii.gz", images / "good_0000.nii.gz")
    _link(fixture_dataset / "labelsTr" / "cord_b.nii.gz", labels / "good.nii.gz")
    # A second channel is only a warning (the first channel is used).
    _link(fixture_dataset / "imagesTr" / "cord_a_0000.nii.gz", images / "good_0001.nii.gz")
    rng = np.random.default_rng(0)
    vol = (rng.random((20, 20, 20)) * 100 + 1).astype(np.float32)
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:10, 5:10, 5:10] = 1
    # missing image: label only
    _save(labels / "missing.nii.gz", lab)
    # not NIfTI
    images.mkdir(parents=True, exist_ok=True)
    (images / "text_0000.nii.gz").write_text("this is not an image")
    _save(labels / "text.nii.gz", lab)
    # 2D image, 4D image
    _save(images / "flat_0000.nii.gz", vol[:, :, 0])
    _save(labels / "flat.nii.gz", lab)
    _save(images / "movie_0000.nii.gz", np.stack([vol, vol], axis=-1))
    _save(labels / "movie.nii.gz", lab)
    # grid mismatch (shape) and affine mismatch
    _save(images / "shape_0000.nii.gz", vol)
    _save(labels / "shape.nii.gz", lab[:, :, :18])
    _save(images / "shift_0000.nii.gz", vol)
    _save(labels / "shift.nii.gz", lab, affine=np.diag([1.0, 1.0, 1.2, 1.0]))
    # empty label
    _save(images / "empty_0000.nii.gz", vol)
    _save(labels / "empty.nii.gz", np.zeros_like(lab))
    # NaN voxels in the image, and in a float label
    bad = vol.copy()
    bad[3, 3, 3] = np.nan
    _save(images / "nan_0000.nii.gz", bad)
    _save(labels / "nan.nii.gz", lab)
    _save(images / "nanlab_0000.nii.gz", vol)
    flab = lab.astype(np.float32)
    flab[0, 0, 0] = np.nan
    _save(labels / "nanlab.nii.gz", flab)
    out = tmp_path / "out"
    stats = evaluate_dataset(root, CKPT, out, num_clicks=1, progress=False, model=golden_model)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_ok"] == 1
    assert [r["case"] for r in summary["metric_per_case"]] == ["good"]
    errors = {f["case"]: f["error"] for f in summary["failed"]}
    expected = {
        "missing": "has no image",
        "text": "cannot be read as NIfTI",
        "flat": "expected a 3D volume",
        "movie": "expected a 3D volume",
        "shape": "grid mismatch",
        "shift": "grid mismatch",
        "empty": "no foreground",
        "nan": "non-finite",
        "nanlab": "non-finite",
    }
    assert set(errors) == set(expected)
    assert len(summary["warnings"]) == 1 and "extra channels" in summary["warnings"][0]
    for case, message in expected.items():
        assert message in errors[case], (case, errors[case])
    # Failed cases are finished too: a re-run does not recompute them.
    again = evaluate_dataset(root, CKPT, out, num_clicks=1, progress=False, model=golden_model)
    assert again.computed == []
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sum(r["status"] == "failed" for r in rows) == len(expected)
    assert stats.summary["num_failed"] == len(expected)
    # The label without an image is a failed case of the scan: the counts add up.
    assert stats.summary["num_cases"] == stats.summary["num_ok"] + stats.summary["num_failed"]
    retry = evaluate_dataset(
        root, CKPT, out, num_clicks=1, progress=False, model=golden_model, retry_failed=True
    )
    assert sorted(retry.computed) == sorted(set(expected) - {"missing"})


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_errors(fixture_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--checkpoint", str(CKPT), "--out", str(out), "--no-progress"]
    assert main(["--data", str(tmp_path / "nope"), *base]) == 2
    assert "folder not found" in _one_error_line(capsys.readouterr().err)
    assert main(["--data", str(fixture_dataset), *base, "--clicks", "0"]) == 2
    assert "--clicks" in _one_error_line(capsys.readouterr().err)
    bad_ckpt = tmp_path / "bad.pth"
    bad_ckpt.write_bytes(b"not a checkpoint")
    argv = ["--data", str(fixture_dataset), "--checkpoint", str(bad_ckpt), "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    assert str(bad_ckpt) in _one_error_line(capsys.readouterr().err)
    assert not out.exists()  # a run that cannot start leaves no folder to trip a re-run
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    argv = ["--data", str(fixture_dataset), "--checkpoint", str(not_ckpt), "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    assert "no config.json; not a converted checkpoint" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()
    out.mkdir()
    (out / "summary.json").write_text("someone else's")
    assert main(["--data", str(fixture_dataset), *base]) == 2
    assert "not an evaluation run" in _one_error_line(capsys.readouterr().err)
    assert (out / "summary.json").read_text() == "someone else's"
    (out / "summary.json").unlink()
    (out / "run.json").write_text("{}")
    (out / "predictions").write_text("in the way")
    assert main(["--data", str(fixture_dataset), *base, "--save-predictions"]) == 2
    assert "predictions is a file" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["predictions", "run.json"]
    with pytest.raises(SystemExit) as info:
        main(["--data", str(fixture_dataset), "--protocol", "nope", *base])
    assert info.value.code == 2
    assert "invalid choice" in _one_error_line(capsys.readouterr().err)


def test_out_on_a_read_only_file_system(fixture_dataset, tmp_path, monkeypatch, capsys):
    """Permission bits allow it, the file system refuses it: named before the model loads."""
    out = tmp_path / "ro" / "out"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out or out in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    argv = ["--data", str(fixture_dataset), "--checkpoint", str(tmp_path / "nope")]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    assert "no such file" in _one_error_line(capsys.readouterr().err)  # checkpoint first
    argv = ["--data", str(fixture_dataset), "--checkpoint", str(CKPT), "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out {out}: cannot create it (Read-only file system)" in line


def test_resume_with_data_written_another_way(fixture_dataset, golden_model, tmp_path, monkeypatch):
    """--data relative or absolute, through a symlink or not: the same cases, none redone."""
    link = tmp_path / "data_link"
    link.symlink_to(fixture_dataset)
    out = tmp_path / "out"
    kwargs = dict(num_clicks=1, limit=1, progress=False, model=golden_model)
    assert evaluate_dataset(fixture_dataset, CKPT, out, **kwargs).computed == ["cord_a"]
    monkeypatch.chdir(tmp_path)
    assert evaluate_dataset(Path("data_link"), CKPT, out, **kwargs).computed == []
    assert evaluate_dataset(link, CKPT, out, **kwargs).computed == []


def test_a_run_where_every_case_fails_exits_non_zero(tmp_path, capsys):
    root = tmp_path / "Dataset010_Empty"
    vol = (np.random.default_rng(0).random((20, 20, 20)) * 100 + 1).astype(np.float32)
    _save(root / "imagesTr" / "empty_0000.nii.gz", vol)
    _save(root / "labelsTr" / "empty.nii.gz", np.zeros((20, 20, 20), np.uint8))
    out = tmp_path / "out"
    argv = ["--data", str(root), "--checkpoint", str(CKPT), "--out", str(out), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "failed: empty" in err and "error: no case was evaluated (1 failed" in err
    assert json.loads((out / "summary.json").read_text())["num_failed"] == 1


def test_cli_subprocess_exit_code(tmp_path):
    cmd = [sys.executable, "evaluate.py", "--data", str(tmp_path / "none"), "--checkpoint"]
    cmd += [str(CKPT), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "folder not found" in _one_error_line(proc.stderr)
    assert not (tmp_path / "out").exists()


SHARED_CASES = {
    # case: (image, label, classes kept (None = all))
    "lung1": ("pyradiomics/lung1_image.nii.gz", "pyradiomics/lung1_label.nii.gz", None),
    "brain1": ("pyradiomics/brain1_image.nii.gz", "pyradiomics/brain1_label.nii.gz", None),
    "breast1": ("pyradiomics/breast1_image.nii.gz", "pyradiomics/breast1_label.nii.gz", None),
    "sct_t2": ("sct_testing_data/t2.nii.gz", "sct_testing_data/t2_seg-manual.nii.gz", None),
    "sct_t2_levels": (
        "sct_testing_data/t2.nii.gz",
        "sct_testing_data/t2_seg-manual_labeled.nii.gz",
        [3, 5],
    ),
    "sct_t1w": ("sct_testing_data/t1w.nii.gz", "sct_testing_data/t1w_seg-manual.nii.gz", None),
    "sct_t2s": ("sct_testing_data/t2s.nii.gz", "sct_testing_data/t2s_gmseg_manual.nii.gz", None),
    "ts_ct_sm": (
        "totalsegmentator/example_ct_sm.nii.gz",
        "totalsegmentator/example_seg.nii.gz",
        [5, 52],
    ),
    "ts_ct": (
        "totalsegmentator/example_ct.nii.gz",
        "totalsegmentator/example_seg_fast_force_split.nii.gz",
        [2, 22],
    ),
    "ts_mr": (
        "totalsegmentator/example_mr_sm.nii.gz",
        "totalsegmentator/example_seg_mr.nii.gz",
        [5, 23],
    ),
    "ts_aorta": (
        "totalsegmentator/aorta_ct_cropped_1.5mm.nii.gz",
        "totalsegmentator/aorta_ct_cropped_1.5mm_aorta.nii.gz",
        None,
    ),
    "ts_pulmonary": (
        "totalsegmentator/pulmonary_ct_cropped_1.5mm.nii.gz",
        "totalsegmentator/pulmonary_ct_cropped_1.5mm_pulmonary_artery.nii.gz",
        None,
    ),
    "mni_gm": (
        "nilearn_mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "nilearn_mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "gm>127",
    ),
}


@pytest.fixture(scope="module")
def shared_dataset(shared_dir, tmp_path_factory):
    """Every real image/label pair of ../shared/data as one nnU-Net dataset (1-2 classes each)."""
    data = shared_dir / "data"
    root = tmp_path_factory.mktemp("shared") / "Dataset100_Real"
    for case, (image, label, classes) in SHARED_CASES.items():
        _link(data / image, root / "imagesTr" / f"{case}_0000.nii.gz")
        dst = root / "labelsTr" / f"{case}.nii.gz"
        if classes is None:
            _link(data / label, dst)
            continue
        lab = nib.load(data / label)
        arr = np.asarray(lab.dataobj)
        if classes == "gm>127":
            kept = (arr > 127).astype(np.uint8)
        else:
            kept = np.where(np.isin(arr, classes), arr, 0).astype(arr.dtype)
        _save(dst, kept, lab)
    # The AMOS label has no image in ../shared: the scan reports it, the run goes on.
    _link(data / "sammed3d_amos" / "amos_0013_label.nii.gz", root / "labelsTr" / "amos_0013.nii.gz")
    return root


@pytest.mark.shared
@pytest.mark.parametrize("protocol", ["sammed3d", "cvpr25"])
def test_every_real_volume(protocol, shared_dataset, golden_model, tmp_path, capsys):
    out = tmp_path / "out"
    stats = evaluate_dataset(
        shared_dataset,
        CKPT,
        out,
        protocol=protocol,
        num_clicks=2,
        save_predictions=True,
        progress=False,
        model=golden_model,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_ok"] == len(SHARED_CASES)
    assert [f["case"] for f in summary["failed"]] == ["amos_0013"]
    assert "has no image" in summary["failed"][0]["error"]
    assert sorted(stats.computed) == sorted(SHARED_CASES)
    for record in summary["metric_per_case"]:
        label = nib.load(record["label"])
        pred = nib.load(out / record["prediction"])
        assert pred.shape == label.shape
        np.testing.assert_array_equal(pred.affine, label.affine)
        for res in record["classes"].values():
            assert all(0.0 <= v <= 1.0 for v in res["dice"] + res["nsd"])
    with capsys.disabled():
        total = summary["timings"]["total_s"]
        print(f"\n[evaluate] {protocol}: {summary['num_ok']} real volumes in {total:.1f} s")
