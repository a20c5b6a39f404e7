"""Atomic output files (sammed3d_jax.files)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from sammed3d_jax.files import atomic_path, replace_durably, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "b.bin") as tmp:
            open(tmp, "wb").close()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o640  # not mkstemp's 0o600
    assert _mode(tmp_path / "b.bin") == 0o640
    assert (tmp_path / "a.json").read_text() == "{}"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    dst = tmp_path / "sub" / "out.txt"
    write_atomic(dst, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dst) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.txt"]


def test_outputs_are_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    # The new file's data reach the disk before it replaces the old one, and the folder's
    # entry (the rename) after: otherwise a power loss can leave an empty or old file.
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "a.json", "{}")
    assert events == [("fsync", "file"), ("replace", "a.json"), ("fsync", "dir")]

    events.clear()
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.bin").write_bytes(b"x")
    replace_durably(src, tmp_path / "done")
    assert events[-2:] == [("replace", "done"), ("fsync", "dir")]
    assert ("fsync", "file") in events[:-2] and events[:-2].count(("fsync", "dir")) == 2
    assert (tmp_path / "done" / "sub" / "x.bin").read_bytes() == b"x"


def test_file_systems_without_fsync_are_tolerated_and_io_errors_are_not(tmp_path, monkeypatch):
    import errno

    def refuse(fd):
        raise OSError(errno.EINVAL, "fsync not supported")

    monkeypatch.setattr(os, "fsync", refuse)
    write_atomic(tmp_path / "a.txt", "new")  # e.g. a FUSE mount: written, not synced
    assert (tmp_path / "a.txt").read_text() == "new"

    def broken(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        write_atomic(tmp_path / "a.txt", "newer")
    assert (tmp_path / "a.txt").read_text() == "new"  # the old file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_checkpoint_folder_overwrite_keeps_the_old_one_when_the_swap_fails(tmp_path, monkeypatch):
    from sammed3d_jax import checkpoint

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(os.path.basename(dst))
        if len(calls) == 2:  # moving the new folder into place
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with checkpoint._atomic_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_overwrite_replaces_only_a_checkpoint_folder(tmp_path):
    """--overwrite never deletes a folder of other files (the source's own folder, a
    dataset): only what a converted checkpoint holds may be replaced."""
    from sammed3d_jax import checkpoint

    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pth").write_text("the source")
    with pytest.raises(checkpoint.CheckpointError, match=r"not a converted checkpoint.*model\.pth"):
        with checkpoint._atomic_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
    assert (out / "model.pth").read_text() == "the source"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (out / "model.pth").unlink()
    for name in ("config.json", "conversion_report.json"):
        (out / name).write_text("old")
    (out / "params").mkdir()
    with checkpoint._atomic_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_output_checks_name_the_argument(tmp_path):
    from sammed3d_jax.files import check_output_file

    (tmp_path / "folder.nii.gz").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "in.nii.gz").write_text("x")
    check_output_file(tmp_path / "new" / "deeper" / "out.nii.gz", "--out")  # created later
    for dst, message in (
        (tmp_path / "folder.nii.gz", "--out .*folder.nii.gz: is a folder"),
        (tmp_path / "afile" / "out.nii.gz", "--out .*afile is a file, not a folder"),
        (tmp_path / "." / "in.nii.gz", "--out .*: is the input file"),
    ):
        with pytest.raises(ValueError, match=message):
            check_output_file(dst, "--out", inputs=[tmp_path / "in.nii.gz"])


def test_write_errors_name_the_output_not_its_temporary(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for dst in (tmp_path / "afile" / "out.json", tmp_path / "adir"):
        with pytest.raises(OSError) as info:
            write_atomic(dst, "data")
        assert f"cannot write {dst}" in str(info.value) and ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


@pytest.mark.parametrize("name", ["a" * 247 + ".nii.gz", "é" * 127 + "x"], ids=["ascii", "utf8"])
def test_the_longest_valid_names_can_be_written(tmp_path, name):
    """Temporary names stay within the 255-byte file-name limit for any valid output name
    (multi-byte characters cut at a byte boundary included)."""
    from sammed3d_jax.checkpoint import _atomic_dir
    from sammed3d_jax.convert.pth import load_pth, save_pth

    assert len(os.fsencode(name)) <= 255
    write_atomic(tmp_path / name, "x")
    assert (tmp_path / name).read_text() == "x"
    (tmp_path / "pth").mkdir()
    save_pth(tmp_path / "pth" / name, {"w": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(load_pth(tmp_path / "pth" / name)["w"], np.zeros(2))
    for overwrite in (False, True):  # a new folder, then one replaced
        with _atomic_dir(tmp_path / "dirs" / name, overwrite=overwrite) as tmp:
            (tmp / "config.json").write_text(str(overwrite))
    assert (tmp_path / "dirs" / name / "config.json").read_text() == "True"
    assert [p.name for p in (tmp_path / "dirs").iterdir()] == [name]
