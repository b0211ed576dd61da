"""Checkpoints: Hugging Face folders plus ``training.json``, swapped in atomically.

A checkpoint is written to a temporary sibling folder and renamed into place, so a crash,
a full disk or a cancel mid-write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from napari_vlsm.core.atomic import atomic_folder, recover_folder
from napari_vlsm.core.file_names import BEST, LAST, METADATA  # noqa: F401  (re-exported for callers)

LINK_FROM_BYTES = 1 << 20


def check_writable(out_dir, what: str = "checkpoints") -> Path:
    """Create ``out_dir`` if needed and prove a file can be written there (``what``: what
    goes there, for the message)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OSError(f"Cannot write {what} to {out}: {exc.strerror or exc}. "
                      "Choose a writable folder with free space.") from exc
    return out


def new_run_folder(parent, prefix: str = "finetune") -> Path:
    """A folder for a new training run in ``parent``, named by the time it started and never
    one that exists (two runs started in one second get ``-2``, ``-3``): created, empty."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        out = parent / (base if n == 1 else f"{base}-{n}")
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue
    raise OSError(f"Too many training runs named {base} in {parent}.")


def unsound(backend, val_dice: float | None = None) -> str | None:
    """Why ``backend``'s weights must not be kept as a checkpoint (None: they may be): a weight
    that is not finite, a validation Dice that is not finite (the model's logits on the
    validation images were not), or logits for a plain grey image that are not finite (weights
    so large that every answer overflows, as after a learning rate of 1e30)."""
    import math

    import numpy as np
    import torch

    module = backend.module
    if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        return "has weights that are NaN or infinite"
    if val_dice is not None and not math.isfinite(val_dice):
        return f"answers the validation images with NaN or infinite values (validation Dice {val_dice})"
    modes = {m: m.training for m in module.modules()}  # some norms stay in eval while training: kept as they are
    module.eval()
    try:
        with torch.no_grad():
            h, w = backend.input_size
            features = backend.encode_image(backend.preprocess([np.full((h, w, 3), 128, np.uint8)]))
            logits = backend.decode(features, backend.encode_text(["polyp"]))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not bool(torch.isfinite(torch.as_tensor(logits)).all()):
        return "answers a plain grey image with NaN or infinite values (its weights diverged)"
    return None


def save_checkpoint(backend, target, metadata: dict, extras: dict | None = None) -> Path:
    """Write ``backend``'s model and ``metadata`` to ``target`` atomically; ``extras`` maps
    names to folders copied in with it (the replay sample) or to dicts written as JSON (the
    model card)."""
    from napari_vlsm.core.models.loading import quiet_transformers

    quiet_transformers()

    def write(tmp: Path) -> None:
        backend.save(tmp)
        for name, extra in (extras or {}).items():
            if isinstance(extra, dict):
                (tmp / name).write_text(json.dumps(extra, indent=1))
            else:
                shutil.copytree(extra, tmp / name)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=1, default=str))

    return _write_atomically(Path(target), write)


def copy_checkpoint(source, target) -> Path:
    """Put a copy of the checkpoint ``source`` at ``target`` atomically. Its large files (the
    weights) are linked, not copied, where the filesystem allows: a save never changes a
    checkpoint's files in place (it writes a new folder), so the two folders can share them."""
    def link(src: str, dst: str) -> None:
        if os.path.getsize(src) < LINK_FROM_BYTES:  # small files (JSON a person may edit) are copied
            shutil.copy2(src, dst)
            return
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    return _write_atomically(Path(target), lambda tmp: shutil.copytree(source, tmp, copy_function=link,
                                                                       dirs_exist_ok=True))


def _write_atomically(target: Path, write) -> Path:
    """``write(folder)`` into a new temporary sibling of ``target``, then swap it in."""
    return atomic_folder(target, write)


def recover_checkpoints(out_dir) -> list[str]:
    """Put a run folder back in order after a kill: a checkpoint whose swap was cut between
    its two renames gets its previous version back; leftover temporary folders go. Returns
    what was done, for the log."""
    out, notes = Path(out_dir), []
    if not out.is_dir():
        return notes
    for name in (BEST, LAST):
        notes += recover_folder(out / name)
    return notes


def read_metadata(folder) -> dict:
    path = Path(folder) / METADATA
    return json.loads(path.read_text()) if path.exists() else {}
