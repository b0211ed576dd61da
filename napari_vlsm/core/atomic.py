"""Writing files so that a crash, a full disk or a kill never leaves a half-written one.

Everything is written to a temporary file in the target's folder and renamed over the
target. The rename replaces a symbolic link at the target rather than writing through it,
so nothing outside the output folder is touched. Temporary files are created private
(mkstemp); the final file gets the mode the user's umask gives any new file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
