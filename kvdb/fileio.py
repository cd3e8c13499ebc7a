"""Crash-safe file writes: a reader (or a process restarted after a kill) sees the old file or the new one, never
half of one.

Temporary names are ``.NAME.<pid>.<random>.tmp`` beside the target, so `kvdb doctor` can tell a write in progress
(its process is alive) from one a kill interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from kvdb.errors import StoreError


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
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


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside ``path``; on success its files are fsynced and it is renamed to ``path``, which
    so appears whole or not at all. Such a folder is written once: where another process put ``path`` in place first,
    its folder is kept and this one dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    try:
        yield tmp
        for folder, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(folder, name), "rb+") as f:
                    os.fsync(f.fileno())
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the other writer's folder is in place, whole
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


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
