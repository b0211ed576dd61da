"""Checkpoints: Hugging Face folders plus ``training.json``, swapped in atomically.

A checkpoint is written to a temporary sibling folder and renamed into place, so a crash,
a full disk or a cancel mid-write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

METADATA = "training.json"


def check_writable(out_dir) -> Path:
    """Create ``out_dir`` if needed and prove a file can be written there."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OSError(f"Cannot write checkpoints to {out}: {exc.strerror or exc}. "
                      "Choose a writable folder with free space.") from exc
    return out


def save_checkpoint(backend, target, metadata: dict, extras: dict | None = None) -> Path:
    """Write ``backend``'s model and ``metadata`` to ``target`` atomically; ``extras`` maps
    names to folders copied in with it (the replay sample) or to dicts written as JSON (the
    model card)."""
    from .loading import quiet_transformers

    quiet_transformers()
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-tmp-"))
    try:
        backend.save(tmp)
        for name, extra in (extras or {}).items():
            if isinstance(extra, dict):
                (tmp / name).write_text(json.dumps(extra, indent=1))
            else:
                shutil.copytree(extra, tmp / name)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=1, default=str))
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


def read_metadata(folder) -> dict:
    path = Path(folder) / METADATA
    return json.loads(path.read_text()) if path.exists() else {}
