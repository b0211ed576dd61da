"""Folder labelling on a Dask cluster: the same masks as ``segment_files``, from many workers.

The client (the ``segment`` command) splits the images not yet done into small tasks, each a
few images with the mask file each one goes to; a worker loads the model once (kept per worker
process, not per task), segments the task's images with the same predictor code as the single
process path and writes each mask itself, atomically, into the output folder, which must be on
a filesystem every worker and the client see. The client writes ``labels.json`` and the report
as results come in, so ``--resume`` works the same whichever path wrote a folder.

A worker that dies mid-task has the task run again elsewhere by the scheduler (a mask written
twice is written whole both times, with the same bytes); a task that kills workers over and over
(Dask's ``allowed-failures``) is reported as failed for its images, and an image that cannot be
read or segmented fails alone, reported, never retried.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

from napari_vlsm.core.inference.folder_labeling import FileOutcome, plan_masks

TASK_SIZE = 4  # images per task: small enough to spread, large enough to hide the scheduling cost
_PREDICTORS: dict = {}  # in each worker process: (spec, device, dtype) -> its Predictor


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def local_cluster(n_workers: int):
    """A LocalCluster of ``n_workers`` processes on this machine, one task at a time each, on
    the loopback address; each worker's torch gets an equal share of the cores."""
    from distributed import LocalCluster

    if n_workers < 1:
        raise ValueError("--cluster local:N needs N of 1 or more workers.")
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None)


def threads_per_worker(n_workers: int) -> int:
    return max(1, cores() // max(1, n_workers))


def _predictor(spec: str, device: str, dtype: str, threads: int | None):
    key = (spec, device, dtype)
    if key not in _PREDICTORS:
        import torch

        from napari_vlsm.core.inference.predictor import Predictor
        from napari_vlsm.core.models.loading import load_model

        if threads:
            torch.set_num_threads(threads)
        _PREDICTORS.clear()  # one model per worker
        _PREDICTORS[key] = Predictor(load_model(spec, device=device, dtype=dtype))
    return _PREDICTORS[key]


def segment_task(spec: str, device: str, dtype: str, threads: int | None, items: list, prompts: list[str],
                 threshold: float) -> list[FileOutcome]:
    """Run on a worker: segment each (image, mask file) of ``items`` and write its mask."""
    from napari_vlsm.core.inference.folder_labeling import _read, _run_batch, _write

    predictor = _predictor(spec, device, dtype, threads)
    outcomes = []
    for path, target in items:
        image, error = _read(Path(path))
        if error:
            outcomes.append(FileOutcome(Path(path), "failed", message=error))
            continue
        for res, labels in _run_batch(predictor, [(Path(path), image)], prompts, {Path(path): Path(target)},
                                      threshold):
            if res.status == "ok":
                error = _write(res.out, labels)
                res = FileOutcome(res.path, "failed", message=error) if error else res
            outcomes.append(res)
    return outcomes


def segment_on_cluster(client, spec: str, paths: list[Path], prompts: list[str], out_dir, threshold: float = 0.5,
                       resume: bool = False, fmt: str = "png", device: str = "auto", dtype: str = "auto",
                       threads: int | None = None, task_size: int = TASK_SIZE) -> Iterator[FileOutcome]:
    """Like ``segment_files``: a FileOutcome per image (as given), as the cluster finishes them."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    targets, skipped, todo = plan_masks(out_dir, paths, fmt, resume)
    yield from skipped
    local = Path(spec).expanduser()
    spec = str(local.absolute()) if local.exists() else spec  # workers may start in another folder
    chunks = {}
    for i in range(0, len(todo), task_size):
        chunk = todo[i:i + task_size]
        items = [(str(p.absolute()), str(targets[p].absolute())) for p in chunk]
        key = f"napari-vlsm-segment-{chunk[0].name}-{uuid.uuid4().hex[:8]}"  # names the first image
        future = client.submit(segment_task, spec, device, dtype, threads, items, list(prompts), threshold,
                               key=key, pure=False)
        chunks[future] = chunk
    try:
        for future in as_completed(chunks):
            chunk = chunks[future]
            try:
                results = future.result()
            except KilledWorker:
                for p in chunk:
                    yield FileOutcome(p, "failed", message="the worker segmenting it died on every try (out of "
                                                           "memory?); it was not retried further")
                continue
            except Exception as exc:  # the model could not load on the worker, and the like
                for p in chunk:
                    yield FileOutcome(p, "failed", message=f"{type(exc).__name__}: {exc}")
                continue
            for p, res in zip(chunk, results):
                yield FileOutcome(p, res.status, targets[p] if res.status == "ok" else None, res.message, res.areas)
    finally:
        client.cancel(list(chunks))  # an interrupted run leaves nothing running
