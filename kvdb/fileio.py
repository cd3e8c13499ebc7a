"""Crash-safe file writes: a reader (or a process restarted after a kill) sees the old file or the new one, never
half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from kvdb.errors import StoreError


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_error(path: Path, exc: OSError, after: str = "") -> StoreError:
    """One sentence for a failed file write, by cause; ``after`` says what is left (e.g. "the old file is
    unchanged")."""
    tail = f"; {after}" if after else ""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return StoreError(f"disk full or file too large while writing {path}{tail}; free some space and run the "
                          "command again")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(f"cannot write {path}: its folder is read-only or not writable by you{tail}")
    return StoreError(f"cannot write {path}: {exc.strerror or exc}{tail}")
