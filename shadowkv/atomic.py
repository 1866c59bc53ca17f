"""Crash-safe writes: a reader (or a resumed run) sees the old content or the new, never half.

Both write into a temporary sibling and ``os.replace`` it into place (atomic on POSIX).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Replaces the file ``path`` with ``text``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_dir(path: Path, fill: Callable[[Path], None], replace: bool = True) -> None:
    """Creates the folder ``path`` from what ``fill(tmp_folder)`` writes.

    ``replace=False``: if ``path`` appears meanwhile (another process finished first), keep
    theirs and drop ours.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        fill(tmp)
        if replace:
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError:
        if replace or not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
