"""Atomic, durable file writes: temporary file in the destination folder, fsync, rename, folder fsync.

After :func:`write_atomic` returns, the file survives a crash or power loss and a reader never sees a
half-written file (POSIX ``rename`` replaces the destination atomically within one file system). The
temporary file is named ``.<name>.<pid>.<random>.tmp`` in the destination folder, so a crash leaves
only dot-files ending in :data:`TEMP_SUFFIX` that a sweep can remove (``Spool.remove_stale_temp``).

:func:`write_atomic_with` does the same for writers that want a path rather than bytes (``torch.save``,
``safetensors.torch.save_file``).

Used by the spool (received instances), the result writers (SC, SR, PNG), deliveries to folders, the
study report, model folders (``model.json``, ``model.safetensors``) and training checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from pacs_ai.errors import StorageError

__all__ = [
    "TEMP_SUFFIX",
    "describe_os_error",
    "fsync_dir",
    "temp_path",
    "temp_writer_pid",
    "write_atomic",
    "write_atomic_with",
]

TEMP_SUFFIX = ".tmp"

_PROBLEMS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EEXIST: "a file is in the way of a directory",
    errno.EISDIR: "a directory is in the way of the file",
    errno.EIO: "input/output error",
}


def describe_os_error(exc: OSError, path: Path | str) -> str:
    """A one-line description of ``exc`` naming the problem (disk full, read-only, permission) and path."""
    problem = _PROBLEMS.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot write {path}: {problem} ({exc.strerror or exc})"


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (raises OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A fresh temporary name next to ``path``: ``.<name>.<pid>.<random hex>.tmp``."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}{TEMP_SUFFIX}"


def temp_writer_pid(tmp: Path) -> int:
    """The pid of the process that made the temporary file ``tmp`` (a :func:`temp_path` name
    ``.<name>.<pid>.<hex>.tmp``); raises ValueError for any other name."""
    name = Path(tmp).name
    if not name.endswith(TEMP_SUFFIX):
        raise ValueError(f"not a temporary file name: {name}")
    return int(name[: -len(TEMP_SUFFIX)].rsplit(".", 2)[1])


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_atomic(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` durably and atomically; raise StorageError on any OSError.

    ``sync_dir=False`` leaves the folder's fsync to the caller, who writes several files into one
    folder and then calls :func:`fsync_dir` once.
    """
    path = Path(path)
    tmp = temp_path(path)
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except OSError as exc:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        _unlink_quietly(tmp)
        raise StorageError(describe_os_error(exc, path)) from exc


def write_atomic_with(path: Path, write: Callable[[Path], object], *, sync_dir: bool = True) -> None:
    """Let ``write(tmp)`` create a temporary file, fsync it, rename it over ``path``, fsync the folder.

    For writers that take a path (``torch.save``, ``safetensors.torch.save_file``). The file gets mode
    0644. An OSError while syncing or renaming becomes a StorageError; whatever ``write`` raises
    propagates unchanged. The temporary file is removed on any failure.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise StorageError(describe_os_error(exc, path)) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
