"""Prompt-driven labeling of many image files: read ahead, segment in batches, write behind."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .imageio import read_image, write_mask
from .predictor import Predictor, clean_prompts

SIDECAR = "labels.json"


@dataclass
class FileResult:
    path: Path
    status: str          # "ok" | "skipped" | "failed"
    out: Path | None = None
    message: str = ""
    areas: tuple = ()    # pixels per label value 1..P


def write_sidecar(out_dir: Path, prompts: list[str], model: str, threshold: float) -> Path:
    """labels.json: which label value stands for which prompt, and how the masks were made."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SIDECAR
    path.write_text(json.dumps({"labels": {str(i + 1): p for i, p in enumerate(prompts)}, "background": 0,
                                "model": model, "threshold": threshold}, indent=1))
    return path


def mask_path(out_dir: Path, image: Path, fmt: str) -> Path:
    return out_dir / f"{image.stem}.{fmt}"


def _read(path: Path):
    try:
        return read_image(path), None
    except Exception as exc:  # unreadable or not an image: reported, the run goes on
        return None, f"cannot read {path.name}: {exc}"


def segment_files(predictor: Predictor, paths: list[Path], prompts, out_dir, threshold: float = 0.5,
                  resume: bool = False, fmt: str = "png", batch_size: int = 1, io_threads: int = 4
                  ) -> Iterator[FileResult]:
    """Segment each image with every prompt and write one label mask per image."""
    prompts = clean_prompts(prompts)
    out_dir = Path(out_dir)
    todo = []
    for p in map(Path, paths):
        if resume and mask_path(out_dir, p, fmt).exists():
            yield FileResult(p, "skipped", mask_path(out_dir, p, fmt), "mask exists")
        else:
            todo.append(p)
    with ThreadPoolExecutor(io_threads) as pool:
        writes = []
        reads = pool.map(_read, todo)  # decoding runs ahead of the model
        batch: list[tuple[Path, np.ndarray]] = []
        for path, (image, error) in zip(todo, reads):
            if error:
                yield FileResult(path, "failed", message=error)
                continue
            batch.append((path, image))
            if len(batch) >= batch_size:
                yield from _run_batch(predictor, batch, prompts, out_dir, threshold, fmt, pool, writes)
                batch = []
        if batch:
            yield from _run_batch(predictor, batch, prompts, out_dir, threshold, fmt, pool, writes)
        for fut in writes:
            fut.result()


def _run_batch(predictor, batch, prompts, out_dir, threshold, fmt, pool, writes):
    try:
        preds = predictor.predict_batch([im for _, im in batch], prompts, threshold) if len(batch) > 1 \
            else [_single(predictor, batch[0][1], prompts, threshold)]
    except ValueError as exc:
        if len(batch) == 1:
            yield FileResult(batch[0][0], "failed", message=str(exc))
            return
        for item in batch:  # find the bad one(s), keep the rest
            yield from _run_batch(predictor, [item], prompts, out_dir, threshold, fmt, pool, writes)
        return
    for (path, _), pred in zip(batch, preds):
        labels = pred.labels
        out = mask_path(out_dir, path, fmt)
        writes.append(pool.submit(write_mask, out, labels))
        areas = tuple(int((labels == i + 1).sum()) for i in range(len(prompts)))
        yield FileResult(path, "ok", out, areas=areas)


def _single(predictor: Predictor, image, prompts, threshold):
    predictor.set_image(image)
    return predictor.predict(prompts, threshold)
