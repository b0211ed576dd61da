"""Prompt-driven labeling of many image files: read ahead, segment in batches, write behind."""

from __future__ import annotations

import errno
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from napari_vlsm.core.atomic import atomic_write_text
from napari_vlsm.core.images.imageio import read_image, write_mask
from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD
from napari_vlsm.core.inference.predictor import Predictor, clean_prompts
from napari_vlsm.core.models.loading import model_identity  # noqa: F401  (what labels.json records as the model)

SIDECAR = "labels.json"
REPORT = "segment_report.csv"
LOCK = ".napari-vlsm.lock"


@dataclass
class FileOutcome:
    path: Path
    status: str          # "ok" | "skipped" | "failed"
    out: Path | None = None
    message: str = ""
    areas: tuple = ()    # pixels per label value 1..P


def model_threshold(spec) -> float | None:
    """The threshold a model's folder asks for: the ``threshold`` of its vlsm_card.json (a
    converted CRIS folder carries the 0.35 its benchmark thresholds it at), None when it names
    none or the spec is not a local folder (nothing is fetched)."""
    from napari_vlsm.core.models.model_card import card_for

    try:
        value = card_for(None if spec is None else str(spec)).get("threshold")
    except (OSError, ValueError):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0:
        return float(value)
    return None


def default_threshold(spec) -> float:
    """The threshold to use with the model ``spec`` when none is given: its folder's own
    (``model_threshold``), else DEFAULT_THRESHOLD. The command line and the segmentation dock both ask this."""
    own = model_threshold(spec)
    return DEFAULT_THRESHOLD if own is None else own


def _label_table(prompts: list[str]) -> dict[str, str]:
    return {str(i + 1): p for i, p in enumerate(prompts)}


def check_resume(out_dir: Path, prompts: list[str], model: str | None = None, threshold: float | None = None) -> None:
    """Refuse to write into a folder whose masks were made for other prompts, by another model
    or at another threshold (ValueError), with or without resuming: its labels.json would then
    describe masks it did not make. Settings the folder's labels.json does not record (an
    image series records its labels only) are not compared."""
    path = Path(out_dir) / SIDECAR
    labels = _label_table(prompts)
    try:
        before = json.loads(path.read_text())
        before_labels = before.get("labels")
    except (OSError, ValueError, AttributeError):
        return
    if before_labels is not None and before_labels != labels:
        ordered = [v for _, v in sorted(before_labels.items(), key=lambda kv: int(kv[0]))]
        raise ValueError(f"{path} says the masks there were made for {before_labels}, not {labels}. To go on with "
                         f"them, use prompts={json.dumps(ordered)} with resume=True; for the new prompts, write to a "
                         "new out_dir.")
    made_by = before.get("model")
    if model is not None and isinstance(made_by, str) and made_by != model and model_identity(made_by) != model:
        raise ValueError(f"{path} says the masks there were made by the model {made_by}, not {model}. To go on "
                         f"with them, use model={made_by} with resume=True; for the new model, write to a new "
                         "out_dir.")
    made_at = before.get("threshold")
    if threshold is not None and isinstance(made_at, (int, float)) and float(made_at) != float(threshold):
        raise ValueError(f"{path} says the masks there were made at threshold {made_at}, not {threshold}. To go on "
                         f"with them, use threshold={made_at} with resume=True; for the new threshold, write to a "
                         "new out_dir.")


def write_sidecar(out_dir: Path, prompts: list[str], model: str, threshold: float, resume: bool = False) -> Path:
    """labels.json: which label value stands for which prompt, and how the masks were made
    (``model``: see ``model_identity``). A folder whose masks were made otherwise is refused
    (``check_resume``), resumed or not: its masks would be mislabelled."""
    check_resume(out_dir, prompts, model, threshold)
    path, labels = Path(out_dir) / SIDECAR, _label_table(prompts)
    return atomic_write_text(path, json.dumps({"labels": labels, "background": 0, "model": model,
                                               "threshold": threshold}, indent=1))


def finished_masks(out_dir: Path) -> dict[str, Path]:
    """image path -> its mask, for the images a previous run's report lists as done and
    whose mask is still a non-empty file (a 0-byte mask left by a crash is redone)."""
    import csv

    report = Path(out_dir) / REPORT
    done = {}
    try:
        with open(report, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for row in csv.DictReader(f):
                mask = Path(row.get("mask") or "")
                if row.get("status") in ("ok", "skipped") and mask.is_file() and mask.stat().st_size > 0:
                    done[row["image"]] = mask
    except (OSError, ValueError, csv.Error):
        return {}
    return done


def write_report(out_dir: Path, results, prompts) -> Path:
    """segment_report.csv, written whole or not at all."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "status", "mask", "message"] + [f"area_{i + 1}" for i in range(len(prompts))])
    for r in results:
        w.writerow([r.path, r.status, r.out or "", r.message] + list(r.areas))
    return atomic_write_text(Path(out_dir) / REPORT, buf.getvalue())


class OutputLock:
    """Hold ``out_dir`` for one run: a second run into the same folder is told at once. The
    lock file is opened without following links: a link planted in its place is replaced,
    so nothing outside ``out_dir`` is created or written."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self.fd = None

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o666)
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # ELOOP: the name is a link, which is not ours
                raise
        self.path.unlink()
        return os.open(self.path, flags | os.O_EXCL, 0o666)

    def __enter__(self):
        import fcntl

        self.fd = self._open()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise RuntimeError(f"Another napari-vlsm run is writing into {self.path.parent}; wait for it to "
                               "finish or choose another out_dir.") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def mask_paths(out_dir: Path, images: list[Path], fmt: str) -> dict[Path, Path]:
    """One mask file per image: ``<stem>.<fmt>``; images that share a stem (a.png and
    a.jpg, or one name in two folders) get their suffix and then a number added, so no
    mask overwrites another."""
    taken: set[str] = set()
    out = {}
    for image in images:
        name = image.stem
        if name in taken:
            name = f"{image.stem}_{image.suffix.lstrip('.')}"
        n = 1
        while name in taken:
            n += 1
            name = f"{image.stem}_{n}"
        taken.add(name)
        out[image] = out_dir / f"{name}.{fmt}"
    return out


def _read(path: Path):
    try:
        return read_image(path), None
    except Exception as exc:  # unreadable or not an image: reported, the run goes on
        return None, f"cannot read {path.name}: {exc}"


def _write(out: Path, labels: np.ndarray):
    try:
        write_mask(out, labels)
        return None
    except OSError as exc:
        return f"cannot write {out}: {exc.strerror or exc}"


def inputs_in(out_dir, paths) -> list[Path]:
    """The images among ``paths`` that the folder ``out_dir`` holds (by name, or as the file a
    link points at): masks written there would replace them (a.png's mask is a.png)."""
    out = Path(out_dir).resolve()
    return [p for p in map(Path, paths) if out in (p.absolute().parent.resolve(), p.resolve().parent)]


def describe_held(held: list[Path]) -> str:
    return f"{held[0]}" + (f" and {len(held) - 1} more" if len(held) > 1 else "")


def plan_masks(out_dir, paths, fmt: str, resume: bool) -> tuple[dict, list[FileOutcome], list[Path]]:
    """(image -> its mask file, the images an earlier run finished, as "skipped" outcomes, the
    images still to do), the same for every way of running a folder. An ``out_dir`` that holds
    an image to segment is refused (ValueError): no mask is ever written over an input."""
    paths = [Path(p) for p in paths]
    held = inputs_in(out_dir, paths)
    if held:
        raise ValueError(f"out_dir {out_dir} holds the image {describe_held(held)} to segment: masks written "
                         "there would replace the images. Give another out_dir.")
    targets = mask_paths(Path(out_dir), paths, fmt)
    done = finished_masks(Path(out_dir)) if resume else {}
    skipped = [FileOutcome(p, "skipped", targets[p], "mask exists") for p in paths if done.get(str(p)) == targets[p]]
    taken = {o.path for o in skipped}
    return targets, skipped, [p for p in paths if p not in taken]


def segment_files(predictor: Predictor, paths: list[Path], prompts, out_dir, threshold: float = DEFAULT_THRESHOLD,
                  resume: bool = False, fmt: str = "png", batch_size: int = 1, io_threads: int = 4
                  ) -> Iterator[FileOutcome]:
    """Segment each image with every prompt and write one label mask per image.

    Reading runs a bounded window ahead of the model and writing runs behind it, in a
    thread pool; a file is reported "ok" only once its mask is on disk."""
    prompts = clean_prompts(prompts)
    targets, skipped, todo = plan_masks(out_dir, paths, fmt, resume)
    yield from skipped
    window = max(2 * batch_size, 2 * io_threads)
    with ThreadPoolExecutor(io_threads) as pool:
        reads = deque(pool.submit(_read, p) for p in todo[:window])
        pending = deque()  # (FileOutcome, write future)
        batch: list[tuple[Path, np.ndarray]] = []
        for i, path in enumerate(todo):
            image, error = reads.popleft().result()
            if i + window < len(todo):
                reads.append(pool.submit(_read, todo[i + window]))
            if error:
                yield FileOutcome(path, "failed", message=error)
            else:
                batch.append((path, image))
            if batch and (len(batch) >= batch_size or i == len(todo) - 1):
                for res, labels in _run_batch(predictor, batch, prompts, targets, threshold):
                    if res.status == "ok":
                        pending.append((res, pool.submit(_write, res.out, labels)))
                    else:
                        yield res
                batch = []
            while pending and (pending[0][1].done() or len(pending) > window):
                yield _finish(*pending.popleft())
        while pending:
            yield _finish(*pending.popleft())


def _finish(res: FileOutcome, write) -> FileOutcome:
    error = write.result()
    if error:
        return FileOutcome(res.path, "failed", message=error)
    return res


def _run_batch(predictor, batch, prompts, targets, threshold):
    """(FileOutcome, labels) per image; a bad image fails alone, the rest go on."""
    try:
        preds = predictor.predict_batch([im for _, im in batch], prompts, threshold) if len(batch) > 1 \
            else [_single(predictor, batch[0][1], prompts, threshold)]
    except ValueError as exc:
        if len(batch) == 1:
            yield FileOutcome(batch[0][0], "failed", message=str(exc)), None
            return
        for item in batch:
            yield from _run_batch(predictor, [item], prompts, targets, threshold)
        return
    for (path, _), pred in zip(batch, preds):
        labels = pred.labels
        areas = tuple(int((labels == i + 1).sum()) for i in range(len(prompts)))
        yield FileOutcome(path, "ok", targets[path], areas=areas), labels


def _single(predictor: Predictor, image, prompts, threshold):
    predictor.set_image(image)
    return predictor.predict(prompts, threshold)
