"""Atomic, durable file output: write under a temporary name beside the target, flush it to
disk, rename it over the target, then flush the folder (so the rename itself survives a
power loss or a preempted machine, not only a crashed process)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
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


# fsync errors meaning "this file system does not sync" rather than "the data are lost"
_NO_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS}


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk (a no-op where the file system cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # a file its owner may write but not read
        fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_SYNC:
            raise
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (creations, renames) to disk, where the file system can.

    Some file systems (network mounts, a few FUSE ones) refuse to sync a folder; the rename
    has still happened there, so that is not an error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under ``root`` (before renaming a finished folder)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(folder)


def replace_durably(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace(src, dst)`` after flushing ``src`` (a file or a folder tree), then the
    folder that holds ``dst``."""
    if os.path.isdir(src):
        fsync_tree(src)
    else:
        fsync_file(src)
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def temp_prefix(name: str) -> str:
    """``".<name>."`` for a temporary file beside ``name``, with the name cut to 100 bytes:
    a long (but valid) output name plus the random part would pass the 255-byte limit of
    a file name and fail only when the output is written."""
    raw = os.fsencode(name)
    return f".{os.fsdecode(raw[:100]) if len(raw) > 100 else name}."


@contextlib.contextmanager
def atomic_path(dst: Path, suffix: str = "") -> Iterator[str]:
    """A temporary file name beside ``dst``, renamed over it when the block succeeds.

    Readers never see a partial ``dst``, and the new file is on disk before it replaces the
    old one (:func:`replace_durably`); on an error the temporary file is removed. The file
    gets the permissions of a newly created one (0o666 less the umask), not mkstemp's 0o600,
    so outputs stay readable by whoever could read the folder's other files.
    """
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dst.name), suffix=suffix, dir=dst.parent)
    except OSError as e:
        raise _naming(e, dst) from e
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        yield tmp
        try:
            replace_durably(tmp, dst)
        except OSError as e:
            raise _naming(e, dst) from e
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _naming(error: OSError, dst: Path) -> OSError:
    """The same error, naming the output rather than its temporary file."""
    return type(error)(error.errno, f"cannot write {dst}: {error.strerror}")


def write_atomic(dst: Path, data: bytes | str) -> None:
    """Write ``data`` to ``dst`` atomically and durably (see :func:`atomic_path`)."""
    with atomic_path(dst, suffix=".tmp") as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode(errors="surrogateescape") if isinstance(data, str) else data)


def check_output_file(dst: Path, flag: str, inputs: Sequence[Path] = ()) -> None:
    """Raise ValueError naming ``flag`` if ``dst`` cannot be written as a new or replaced
    file: it is a folder, a parent is a file or not writable, or it is one of ``inputs``.

    Called before the work that produces the output, so that a bad path fails at once and
    names the argument (not a temporary file deep in the write).
    """
    dst = Path(dst)
    if dst.is_dir():
        raise ValueError(f"{flag} {dst}: is a folder, not a file name")
    for parent in dst.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {dst}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {dst}: cannot write in {parent}")
            break
    for source in inputs:
        if dst.exists() and Path(source).exists() and os.path.samefile(dst, source):
            raise ValueError(f"{flag} {dst}: is the input file {source}; choose another name")
