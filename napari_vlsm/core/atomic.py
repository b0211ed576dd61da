"""Writing files so that a crash, a full disk or a kill never leaves a half-written one.

Everything is written to a temporary file in the target's folder and renamed over the
target (a folder of files, such as a checkpoint or an ONNX export: to a temporary sibling
folder, swapped in by two renames; ``recover_folder`` repairs a swap cut between them).
The rename replaces a symbolic link at the target rather than writing through it,
so nothing outside the output folder is touched. Temporary files are created private
(mkstemp); the final file gets the mode the user's umask gives any new file.
"""

from __future__ import annotations

import os
import shutil
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
    """``text`` as UTF-8; a file name that was not UTF-8 (held by Python as lone surrogates)
    is written back as its own bytes."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))


def atomic_folder(target, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` into a new temporary sibling of ``target``, then swap it in: the old
    ``target`` is renamed aside, the new one renamed into place, the old one removed. A
    failure or a kill in ``write`` leaves ``target`` as it was."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-tmp-"))
    try:
        apply_umask(tmp, directory=True)
        write(tmp)
        for folder, dirs, files in os.walk(tmp):  # writers that make private files (safetensors: 0600) follow the umask
            for name, directory in [(d, True) for d in dirs] + [(f, False) for f in files]:
                if not os.path.islink(os.path.join(folder, name)):  # never a chmod through a link
                    apply_umask(os.path.join(folder, name), directory)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}-old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def recover_folder(target) -> list[str]:
    """Put ``target`` back in order after a kill during ``atomic_folder``: a swap cut between
    its two renames gets the previous version back; leftover temporary folders go. Returns
    what was done, for the log."""
    target, notes = Path(target), []
    if not target.parent.is_dir():
        return notes
    olds = sorted(target.parent.glob(f".{target.name}-old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
        notes.append(f"restored {target.name}/ from an interrupted save")
    for leftover in olds + list(target.parent.glob(f".{target.name}-tmp-*")):
        shutil.rmtree(leftover, ignore_errors=True)
        notes.append(f"removed {leftover.name}")
    return notes
