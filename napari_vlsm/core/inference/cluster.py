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

``evaluate_on_cluster`` scores a benchmark folder the same way: the client picks every image's
prompt in the order the single process does, the workers segment and score, and the rows come
back in the folder's order, so the Dice is the single process's.

The workers' environment. ``distributed`` starts every worker process with its
``distributed.nanny.pre-spawn-environ``, by default ``MALLOC_TRIM_THRESHOLD_=65536`` and
``OMP_NUM_THREADS=1``. Any explicit glibc malloc threshold switches off glibc's adaptive mmap
threshold, so every large tensor becomes a fresh mmap and its pages are faulted in again on
each call: that one variable made the default model 2.4-2.8x slower in a plain process. So
``local_cluster`` starts its workers with the client's allocator environment (nothing set that
the client does not set) and OpenMP threads equal to the torch threads each worker is given;
``slow_worker_note`` says once when a worker (one started by hand, say) was started otherwise.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD
from napari_vlsm.core.inference.folder_labeling import FileOutcome, plan_masks

TASK_SIZE = 4  # images per task: small enough to spread, large enough to hide the scheduling cost
_PREDICTORS: dict = {}  # in each worker process: (spec, device, dtype) -> its Predictor


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# Environment variables that make glibc's malloc slower for large tensors when set: any of the
# first four switches its adaptive mmap threshold off (mallopt(3)); the tunables can do the same.
ALLOCATOR_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                  "GLIBC_TUNABLES")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_pre_spawn_environ() -> dict:
    """``distributed.nanny.pre-spawn-environ`` for the workers ``local_cluster`` starts: None
    unsets each of Dask's defaults. MALLOC_TRIM_THRESHOLD_=65536 (Dask's way to hand freed memory
    back sooner) costs this kind of work 2.4-2.8x; unset, a worker inherits the client's allocator
    settings, whatever they are, and runs at the client's speed. The thread variables are unset
    here because the nanny also writes these into the client's own environment; ``worker_environ``
    gives them to the worker alone."""
    return {k: None for k in (*ALLOCATOR_VARS[:-1], *THREAD_VARS)}


def worker_environ(threads: int) -> dict:
    """Environment of each worker ``local_cluster`` starts: OpenMP/BLAS threads equal to the
    torch threads the worker gets (cores / N), rather than Dask's 1."""
    return {k: str(threads) for k in THREAD_VARS}


def local_cluster(n_workers: int):
    """A LocalCluster of ``n_workers`` processes on this machine, one task at a time each, on
    the loopback address; each worker's torch gets an equal share of the cores, and every worker
    the client's allocator environment (``worker_pre_spawn_environ``)."""
    import dask
    from distributed import LocalCluster

    if n_workers < 1:
        raise ValueError(f"A local cluster needs 1 or more workers, not {n_workers}.")
    # Each nanny reads the pre-spawn setting when it is made (inside this constructor) and keeps
    # it for every restart of its worker.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_pre_spawn_environ()}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=None, env=worker_environ(threads_per_worker(n_workers)))


def _initial_environ() -> dict:
    """The environment this process started with (what glibc read), else the current one."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def process_environment() -> dict:
    """What decides this process's speed: its allocator variables as it started, its OpenMP
    threads variable, its host and cores. Run on each worker by ``slow_worker_note``."""
    import socket

    start = _initial_environ()
    return {"allocator": {k: start[k] for k in ALLOCATOR_VARS if k in start},
            "omp": os.environ.get("OMP_NUM_THREADS"), "host": socket.gethostname(), "cores": cores()}


def slow_worker_note(client, threads: int | None = None) -> str:
    """One sentence when some worker was started with an allocator setting the client does not
    have (Dask's MALLOC_TRIM_THRESHOLD_=65536 on a worker started by hand with its defaults) or,
    when no torch thread count is sent with the tasks (``threads``), with OMP_NUM_THREADS=1
    where its host has cores for more; "" when every worker runs at the client's speed."""
    mine = process_environment()["allocator"]
    try:
        seen = client.run(process_environment, on_error="return")
    except Exception:  # noqa: BLE001  a worker that cannot answer is not this check's business
        return ""
    seen = {w: e for w, e in seen.items() if isinstance(e, dict)}
    per_host: dict = {}
    for env in seen.values():
        per_host[env["host"]] = per_host.get(env["host"], 0) + 1
    alloc = {w: e["allocator"] for w, e in seen.items() if e["allocator"] != mine}
    single = {w: e for w, e in seen.items() if threads is None and e["omp"] == "1"
              and e["cores"] // per_host[e["host"]] > 1}
    notes = []
    if alloc:
        example = next(iter(alloc.values()))
        what = ", ".join(f"{k}={v}" for k, v in example.items()) or "without " + ", ".join(mine)
        dask_default = "; Dask's default for the workers it starts" if what == "MALLOC_TRIM_THRESHOLD_=65536" else ""
        notes.append(f"{len(alloc)} of {len(seen)} Dask workers started with another memory allocator setting "
                     f"than this process ({what}{dask_default}), which makes the model 2-3x slower there")
    if single:
        notes.append(f"{len(single)} of {len(seen)} Dask workers run torch on one thread (OMP_NUM_THREADS=1, "
                     "Dask's default) on hosts with cores for more")
    if not notes:
        return ""
    return ("; ".join(notes) + ". Start the workers as docs/performance.md says (dask worker with "
            "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{\"MALLOC_TRIM_THRESHOLD_\": None, \"OMP_NUM_THREADS\": N}'), "
            "or give the tasks a number of torch threads (threads).")


def threads_per_worker(n_workers: int) -> int:
    return max(1, cores() // max(1, n_workers))


@dataclass
class DaskSession:
    """A Dask client and what goes with it: the torch threads each worker is sent with the
    tasks (None: the workers' own), and the LocalCluster started for it, which ``close``
    stops with the client."""
    client: object
    threads: int | None = None
    local: object | None = None

    def close(self) -> None:
        self.client.close()
        if self.local is not None:
            self.local.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(workers: int | None = None, scheduler: str | None = None, timeout: float = 30) -> DaskSession:
    """A session on a new LocalCluster of ``workers`` processes on this machine (each worker's
    torch given an equal share of the cores), or on the running scheduler at ``scheduler``.
    Needs Dask's distributed package (ImportError without it); a scheduler that cannot be
    reached raises OSError, TimeoutError or ValueError."""
    from distributed import Client

    if workers:
        local = local_cluster(workers)
        try:
            return DaskSession(Client(local), threads_per_worker(workers), local)
        except BaseException:
            local.close()
            raise
    if not scheduler:
        raise ValueError("Give the number of local workers or the address of a Dask scheduler.")
    return DaskSession(Client(scheduler, timeout=timeout))


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


def segment_on_cluster(client, spec: str, paths: list[Path], prompts: list[str], out_dir, threshold: float = DEFAULT_THRESHOLD,
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


def evaluate_task(spec: str, device: str, dtype: str, threads: int | None, items: list, threshold: float
                  ) -> list[dict]:
    """Run on a worker: score each (example, prompt) of ``items`` with ``evaluate``'s own code."""
    from napari_vlsm.core.inference.evaluate import score_example

    predictor = _predictor(spec, device, dtype, threads)
    return [score_example(predictor, ex, prompt, threshold) for ex, prompt in items]


def evaluate_on_cluster(client, spec: str, data_dir, prompt_type: str = "p1", split: str = "val",
                        threshold: float = DEFAULT_THRESHOLD, seed: int = 0, limit: int | None = None, device: str = "auto",
                        dtype: str = "auto", threads: int | None = None, task_size: int = TASK_SIZE
                        ) -> Iterator[dict]:
    """Like ``evaluate``: one row per image, in the folder's order (a row waits for the ones
    before it), each image asked the prompt the single process asks it. A worker's error (a
    mask that does not fit its image) is raised here as it is raised there; a task that kills
    its workers over and over is a RuntimeError."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    from napari_vlsm.core.inference.evaluate import planned_examples

    plan = list(planned_examples(data_dir, prompt_type, split, seed, limit))  # the prompts, in order
    local = Path(spec).expanduser()
    spec = str(local.absolute()) if local.exists() else spec
    futures = {}
    for i in range(0, len(plan), task_size):
        # paths made absolute: workers may start in another folder
        chunk = [(replace(ex, image=Path(ex.image).absolute(), mask=Path(ex.mask).absolute()), prompt)
                 for ex, prompt in plan[i:i + task_size]]
        key = f"napari-vlsm-evaluate-{chunk[0][0].name}-{uuid.uuid4().hex[:8]}"
        futures[client.submit(evaluate_task, spec, device, dtype, threads, chunk, threshold, key=key,
                              pure=False)] = i // task_size
    done: dict = {}
    ahead = 0
    try:
        for future in as_completed(futures):
            try:
                done[futures[future]] = future.result()
            except KilledWorker:
                raise RuntimeError("a worker scoring the images died on every try (out of memory?)") from None
            while ahead in done:
                yield from done.pop(ahead)
                ahead += 1
    finally:
        client.cancel(list(futures))
