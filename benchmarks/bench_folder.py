"""Folder labelling, one process against a Dask cluster: images per second of `segment` on the
same folder with the same model and prompt, and the ratio to the single process.

Arms, in one run: the single process reading, segmenting and writing one image after another
(no thread pool: what a worker does with a task); the single process as shipped (reading ahead
and writing behind in a thread pool); `--cluster local:1` and `local:2` as `segment` starts them
(worker processes, tasks of 4 images, each worker's torch and OpenMP on cores / N threads, the
client's allocator environment); and, to show the cause of the old slowdown in the same run,
`local:1` started with Dask's own worker environment (MALLOC_TRIM_THRESHOLD_=65536,
OMP_NUM_THREADS=1, as a `dask worker` started by hand with its defaults gets; its torch is given
the same threads). Each arm writes into a new folder; every arm's masks are checked to be the same
bytes as the first arm's. The environment each cluster's workers started with is printed, and the
per-task overhead of the cluster is measured apart: the round trip of empty tasks on the running
LocalCluster, so the scaling to more machines can be judged (a task of 4 images must cost well
above it).

The bars of issue 44: `local:1` within 15% of the single process (no thread pool) on the same
run, and `local:2` at least as fast as `local:1` per image where the machine has the cores for two
workers (each with at least one core to itself). Run on a quiet machine, without OMP_NUM_THREADS
set (the script gives every arm its threads):

    python benchmarks/bench_folder.py [--images 48] [--model default] [--no-dask-defaults]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from napari_vlsm.core.images.imageio import list_images  # noqa: E402
from napari_vlsm.core.inference.cluster import (TASK_SIZE, cores, local_cluster, process_environment,  # noqa: E402
                                                segment_on_cluster, slow_worker_note, threads_per_worker)
from napari_vlsm.core.inference.folder_labeling import segment_files  # noqa: E402
from napari_vlsm.core.inference.predictor import Predictor  # noqa: E402
from napari_vlsm.core.models.loading import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run(outcomes) -> int:
    return sum(o.status == "ok" for o in outcomes)


def masks(folder: Path) -> dict:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def difference(got: dict, reference: dict) -> str:
    """'yes' where every mask is the same, else how many files and pixels differ."""
    if got.keys() != reference.keys():
        return f"NO: {len(got.keys() ^ reference.keys())} files missing on one side"
    differ = [int((got[k] != reference[k]).sum()) for k in got if not np.array_equal(got[k], reference[k])]
    total = sum(m.size for m in got.values())
    return "yes" if not differ else f"NO: {len(differ)} file(s), {sum(differ)} of {total} pixels"


def dask_default_cluster():
    """One worker as Dask starts it with its own defaults (a `dask worker` started by hand): the
    nanny's pre-spawn environment as distributed ships it. The nanny also writes those variables
    into this process's environment, which is put back afterwards by the caller."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=":0")


def describe_workers(client) -> str:
    """The allocator threshold each worker process started with and its OpenMP threads."""
    seen = client.run(process_environment)
    return "; ".join(sorted({f"MALLOC_TRIM_THRESHOLD_={env['allocator'].get('MALLOC_TRIM_THRESHOLD_', '(unset)')}, "
                             f"OMP_NUM_THREADS={env['omp'] or '(unset)'}" for env in seen.values()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--folder", default=str(DATA / "kvasir_seg" / "images"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default="polyp")
    ap.add_argument("--no-dask-defaults", action="store_true",
                    help="Leave out the arm with Dask's default worker environment.")
    args = ap.parse_args()
    import torch
    from distributed import Client

    if os.environ.get("OMP_NUM_THREADS"):
        print(f"Note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set; the arms set their threads "
              "themselves (torch here, OpenMP and torch in the workers).")
    work = Path(tempfile.mkdtemp())
    frames = work / "frames"
    frames.mkdir()
    for p in list_images([Path(args.folder)])[:args.images]:
        shutil.copy(p, frames / p.name)
    files = list_images([frames])
    torch.set_num_threads(cores())
    print(f"Machine: {machine()}; {cores()} cores for this process; {len(files)} images from {args.folder}; "
          f"model {args.model}; prompt {args.prompt!r}")
    predictor = Predictor(load_model(args.model, device="cpu"))
    run(segment_files(predictor, files[:2], [args.prompt], work / "warmup"))
    rows, reference, workers = [], None, {}

    def arm(name, outcomes_of):
        nonlocal reference
        out = work / name.replace(" ", "_").replace(":", "").replace("'", "").replace(",", "")
        t = time.perf_counter()
        ok = run(outcomes_of(out))
        seconds = time.perf_counter() - t
        got = masks(out)
        reference = reference or got
        rows.append((name, ok, seconds, difference(got, reference)))

    def cluster_arm(name, cluster, n):
        with Client(cluster) as client:
            threads = threads_per_worker(n)
            workers[name] = describe_workers(client)
            note = slow_worker_note(client, threads)
            if note:
                workers[name] += f" (the client's note: {note})"
            run(segment_on_cluster(client, args.model, files[:2 * n], [args.prompt], work / f"warm_{len(rows)}",
                                   threads=threads))  # each worker loads the model first
            arm(name, lambda out: segment_on_cluster(client, args.model, files, [args.prompt], out, threads=threads))

    overhead = {}
    arm("single process, no thread pool",
        lambda out: segment_files(predictor, files, [args.prompt], out, io_threads=1))
    arm("single process (shipped: thread pool)", lambda out: segment_files(predictor, files, [args.prompt], out))
    for n in (1, 2):
        with local_cluster(n) as cluster:
            cluster_arm(f"--cluster local:{n}", cluster, n)
            if n == 1:
                with Client(cluster) as client:
                    t = time.perf_counter()
                    client.gather(client.map(lambda i: i, range(200), pure=False))
                    overhead["task"] = (time.perf_counter() - t) / 200
    if not args.no_dask_defaults:
        before = dict(os.environ)
        try:
            with dask_default_cluster() as cluster:
                cluster_arm("local:1 with Dask's default worker environment", cluster, 1)
        finally:
            os.environ.clear()
            os.environ.update(before)
    base = rows[0][2] / max(rows[0][1], 1)
    rate = {name: ok / seconds for name, ok, seconds, _ in rows}
    print()
    print("| arm | images | seconds | images / s | speed vs single process | same masks |")
    print("|---|---|---|---|---|---|")
    for name, ok, seconds, same in rows:
        print(f"| {name} | {ok} | {seconds:.1f} | {ok / seconds:.2f} | {base / (seconds / max(ok, 1)):.2f}x | "
              f"{same} |")
    print("\nWorkers started with:")
    for name, text in workers.items():
        print(f"  {name}: {text}")
    print(f"\nPer-task overhead of the LocalCluster (200 empty tasks, one worker): {overhead['task'] * 1000:.1f} ms; "
          f"a task holds {TASK_SIZE} images ({base * TASK_SIZE * 1000:.0f} ms of work here).")
    single, one, two = rate["single process, no thread pool"], rate["--cluster local:1"], rate["--cluster local:2"]
    print(f"\nBar: local:1 within 15% of the single process: {one / single:.2f}x -> "
          f"{'met' if one >= 0.85 * single else 'NOT met'}")
    if cores() >= 2:
        print(f"Bar: local:2 at least as fast as local:1 per image: {two / one:.2f}x -> "
              f"{'met' if two >= one else 'NOT met'} ({cores()} cores)")
    else:
        print("Bar: local:2 against local:1 needs at least 2 cores; this machine has 1.")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
