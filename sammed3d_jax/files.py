"""Atomic file output: write under a temporary name beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (setting and
    restoring it would briefly apply to files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dst: Path, suffix: str = "") -> Iterator[str]:
    """A temporary file name beside ``dst``, renamed over it when the block succeeds.

    Readers never see a partial ``dst``; on an error the temporary file is removed. The file
    gets the permissions of a newly created one (0o666 less the umask), not mkstemp's 0o600,
    so outputs stay readable by whoever could read the folder's other files.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=suffix, dir=dst.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(dst: Path, data: bytes | str) -> None:
    """Write ``data`` to ``dst`` atomically (flushed to disk before the rename)."""
    with atomic_path(dst, suffix=".tmp") as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
