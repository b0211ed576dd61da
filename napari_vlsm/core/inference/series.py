"""Annotating a folder image by image: which images there are, which are done, where each
mask goes, reading ahead, saving without ever silently replacing a saved mask.

Masks get the names and formats ``napari-vlsm segment`` gives them (``<stem>.png`` in the
output folder, a suffix added where stems collide) and ``labels.json`` says what each label
value means, so a folder annotated in napari and one labelled on the command line look the
same. ``series.json`` in the output folder lists the images marked done, and for each how
well the model's proposal agreed with the saved correction (Dice): the last of those estimate
how good the model is on the images still to do (``estimate``), read on the images that were
handed out at random (``checks``) where there are any; and, under ``settings``, what the
annotating tool needs to take up the session again (its prompts, model, order; an older file
without them opens as before), and under ``clicks`` each image's clicks and box. Reopening
the folder resumes at the first image not done.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from napari_vlsm.core.atomic import atomic_write_text
from napari_vlsm.core.inference.folder_labeling import SIDECAR, describe_held, inputs_in, mask_paths
from napari_vlsm.core.images.imageio import list_images, read_image, write_mask
from napari_vlsm.core.images.metrics import dice
from napari_vlsm.core.inference.uncertainty import ESTIMATE_LAST, estimate_dice

PROGRESS = "series.json"
PREVIOUS = ".previous"
DEFAULT_OUT = "vlsm_masks"


def series_images(folder) -> list[Path]:
    """The images of a folder, or of a data set in the benchmark layout (its images/)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder at {folder}.")
    source = folder / "images" if (folder / "images").is_dir() else folder
    images = list_images([source])
    if not images:
        raise FileNotFoundError(f"{source} holds no images (PNG, JPEG, TIFF, BMP).")
    return images


class Series:
    """The images of one folder and their masks in ``out_dir`` (default: ``folder/vlsm_masks``)."""

    def __init__(self, folder, out_dir=None):
        self.folder = Path(folder)
        self.images = series_images(self.folder)
        self.out_dir = Path(out_dir) if out_dir else self.folder / DEFAULT_OUT
        held = inputs_in(self.out_dir, self.images)
        if held:  # a.png's mask is a.png: saving it would replace the image
            raise ValueError(f"The masks folder {self.out_dir} holds the image {describe_held(held)} of the series: "
                             f"its masks would replace the images. Choose another folder for the masks.")
        self.masks = mask_paths(self.out_dir, self.images, "png")
        progress = read_progress(self.out_dir)
        self.done: set[str] = set(progress.get("done", []))
        self.agreements: list = [a for a in progress.get("agreements", []) if isinstance(a, list) and len(a) == 2]
        self.checks: set[str] = set(progress.get("checks", []))  # images handed out at random
        settings = progress.get("settings")
        self.settings: dict = settings if isinstance(settings, dict) else {}
        clicks = progress.get("clicks")
        self.clicks: dict = clicks if isinstance(clicks, dict) else {}  # image name -> its clicks and box
        self._wrote: dict[int, tuple] = {}  # what this session wrote for each image, as the file's stat
        self._pool = ThreadPoolExecutor(1)
        self._ahead: dict[int, Future] = {}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_done(self) -> int:
        return sum(p.name in self.done for p in self.images)

    def first_undone(self) -> int:
        return next((i for i, p in enumerate(self.images) if p.name not in self.done), 0)

    def image(self, i: int) -> np.ndarray:
        """Image ``i``, read now or taken from the read-ahead; the next one is read ahead."""
        fut = self._ahead.pop(i, None)
        image = fut.result() if fut is not None else read_image(self.images[i])
        if i + 1 < len(self) and i + 1 not in self._ahead:
            self._ahead = {i + 1: self._pool.submit(read_image, self.images[i + 1])}
        return image

    def mask_path(self, i: int) -> Path:
        """Where image ``i``'s mask goes: its own name even where two images share a stem."""
        return self.masks[self.images[i]]

    def saved_mask(self, i: int) -> np.ndarray | None:
        path = self.mask_path(i)
        return read_image(path) if path.exists() and path.stat().st_size > 0 else None

    def would_replace(self, i: int, labels: np.ndarray) -> bool:
        """True when image ``i`` has a saved mask that this session did not write (an earlier
        session's, or the command line's) and that differs from ``labels``. Replacing what this
        session wrote itself (auto-save, Previous) needs no question."""
        if self._wrote.get(i) is not None and self._wrote[i] == _stat(self.mask_path(i)):
            return False
        saved = self.saved_mask(i)
        return saved is not None and not np.array_equal(saved, np.asarray(labels).astype(saved.dtype))

    def save(self, i: int, labels: np.ndarray, prompts: dict[int, str], done: bool = True,
             proposal: np.ndarray | None = None) -> Path:
        """Write image ``i``'s mask (atomically) and ``labels.json``; mark it done. A saved
        mask that differs is first kept in ``.previous/``, so no save loses one. ``proposal``:
        the model's mask as it was shown, whose agreement with the saved one is recorded."""
        target = self.mask_path(i)
        if self.would_replace(i, labels):
            keep = self.out_dir / PREVIOUS / target.name
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target, keep)
        path = write_mask(target, np.asarray(labels))
        self._wrote[i] = _stat(path)
        atomic_write_text(self.out_dir / SIDECAR, json.dumps(
            {"labels": {str(k): v for k, v in sorted(prompts.items())}, "background": 0}, indent=1))
        if done:
            name = self.images[i].name
            self.done.add(name)
            if proposal is not None and np.shape(proposal) == np.shape(labels):
                self.agreements = [a for a in self.agreements if a[0] != name]
                self.agreements.append([name, dice(np.asarray(proposal) != 0, np.asarray(labels) != 0)])
            self._write_progress()
        return path

    def remember(self, settings: dict) -> None:
        """Keep ``settings`` (JSON values) in ``series.json``, for the next session."""
        if settings != self.settings:
            self.settings = dict(settings)
            self._write_progress()

    def keep_clicks(self, name: str, clicks: dict | None) -> None:
        """Keep image ``name``'s clicks and box (JSON values; None: it has none) in
        ``series.json``, so they come back with the image, in this session or the next."""
        if self.clicks.get(name) == clicks:  # None for an image without clicks, as kept
            return
        if clicks is None:
            del self.clicks[name]
        else:
            self.clicks[name] = clicks
        self._write_progress()

    def _write_progress(self) -> None:
        atomic_write_text(self.out_dir / PROGRESS, json.dumps(
            {"done": sorted(self.done), "agreements": self.agreements, "checks": sorted(self.checks),
             "settings": self.settings, "clicks": self.clicks}, indent=1))

    def estimate(self) -> tuple[float | None, int]:
        """``estimate_of`` this series' progress."""
        return estimate_of({"agreements": self.agreements, "checks": sorted(self.checks)})

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def read_progress(out_dir) -> dict:
    """``series.json`` of a series' mask folder: the images done and the agreements; {} if none."""
    try:
        progress = json.loads((Path(out_dir) / PROGRESS).read_text())
    except (OSError, ValueError):
        return {}
    return progress if isinstance(progress, dict) else {}


def estimate_of(progress: dict) -> tuple[float | None, int]:
    """The model's Dice on the images not yet done, estimated from its proposals' agreement
    with the last corrections (None before any), and on how many images handed out at random
    it was read: on those alone where there are any (0: on all, which reads low where the
    images were handed out least sure first)."""
    pairs = [a for a in progress.get("agreements", []) if isinstance(a, list) and len(a) == 2]
    checks = set(progress.get("checks", []))
    drawn = [a[1] for a in pairs if a[0] in checks]
    if drawn:
        return estimate_dice(drawn), len(drawn[-ESTIMATE_LAST:])
    return estimate_dice([a[1] for a in pairs]), 0


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
