"""Atomic output files (sammed3d_jax.files)."""

from __future__ import annotations

import os
import stat

import pytest

from sammed3d_jax.files import atomic_path, write_atomic


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
