"""Crash-safe writes: a reader (or a resumed run) sees the old content or the new, never half.

Both write into a temporary sibling, flush it to disk (fsync), ``os.replace`` it into place
(atomic on POSIX) and fsync the parent folder, so that after a power loss or an OS crash the
new name never points at data still in the page cache (``LATEST`` at an empty checkpoint,
with the previous one already deleted). A failed write removes its temporary.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere ``os.umask`` can only read it by
    setting it, so it is briefly set to the strict 077 (a file another thread creates meanwhile
    gets fewer permissions, never more)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _fsync(path: Path, strict: bool) -> None:
    """fsync a file or folder by name. ``strict`` (files): an error (EIO, ENOSPC at write-back)
    means the data is not on disk, and raises before anything points at it. Folders (their
    entries: a rename) are not strict: some network or FUSE mounts cannot fsync them, and keep
    the ordering they give."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if strict:
            raise


def write_text(path: Path, text: str) -> None:
    """Replaces the file ``path`` with ``text``."""
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Replaces the file ``path`` with ``data``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600 whatever the umask; run files get the mode open() would give them.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, strict=False)


def write_dir(path: Path, fill: Callable[[Path], None], replace: bool = True) -> None:
    """Creates the folder ``path`` from what ``fill(tmp_folder)`` writes.

    ``replace=False``: if ``path`` appears meanwhile (another process finished first), keep
    theirs and drop ours.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700 whatever the umask
        fill(tmp)
        # Some writers create owner-only files too (safetensors' save_file: model.safetensors
        # 0600): everything in the new folder gets the mode open() would give it.
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~umask)
                _fsync(f, strict=True)
        for d in (*(d for d in tmp.rglob("*") if d.is_dir() and not d.is_symlink()), tmp):
            _fsync(d, strict=False)
        if replace:
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        _fsync(path.parent, strict=False)
    except OSError:
        if replace or not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
