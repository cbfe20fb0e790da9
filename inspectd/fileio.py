"""Small file helpers shared by the bundle writer, calibration, the NG archive, the engine cache
and the publisher: all-or-nothing writes and plain-JSON conversion."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, data: bytes, mode: int | None = None, tmp_prefix: str | None = None,
                 sync_dir: bool = True) -> None:
    """Temp file in the same folder + fsync + os.replace (+ fsync of the folder): a reader or a
    crash sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None and exc.errno is not None:  # a failed write names no file: name the target
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


_RENAME_EXCHANGE = 2   # renameat2(2) flag (Linux >= 3.15)
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): a reader sees one or
    the other at each path, never neither. False where the platform or filesystem cannot (the caller
    then falls back to two renames); OSError for any other failure."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux / an old C library
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # this kernel or filesystem cannot swap
        return False
    raise OSError(code, os.strerror(code), str(b))


def is_or_holds(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """`folder` is `path` or one of its parents (replacing `folder` would delete `path`)."""
    folder_abs, path_abs = Path(os.path.abspath(folder)), Path(os.path.abspath(path))
    return folder_abs == path_abs or folder_abs in path_abs.parents


def make_dirs(path: str | os.PathLike) -> Path:
    """mkdir -p. Folders root creates take the owner of the nearest folder that already existed, so
    a state folder owned by the service user stays writable by it after `sudo inspectd calibrate`."""
    path = Path(path)
    missing, existing = [], path
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    path.mkdir(parents=True, exist_ok=True)
    if missing and os.geteuid() == 0:
        owner = os.stat(existing)
        for folder in missing:
            try:
                os.chown(folder, owner.st_uid, owner.st_gid)
            except OSError:
                pass  # the folder is there; its owner is a nicety the write itself does not need
    return path


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (best effort: some filesystems refuse fsync on folders;
    the rename itself is atomic either way)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_value(value: Any) -> Any:
    """Plain JSON types (numpy scalars unwrapped); NaN/inf become null: JSON has no spelling for them."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    return str(value)
