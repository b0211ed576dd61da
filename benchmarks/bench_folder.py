"""Folder labelling, one process against a Dask cluster: images per second of `segment` on the
same folder with the same model and prompt, and the ratio to the single process.

Arms, in one run: the single process reading, segmenting and writing one image after another
(no thread pool); the single process as shipped (reading ahead and writing behind in a thread
pool); `--cluster local:1` and `local:2` (worker processes, tasks of 4 images). Each arm writes
into a new folder; every arm's masks are checked to be the same bytes as the first arm's. The
per-task overhead of the cluster is measured apart: the round trip of empty tasks on the
running LocalCluster, so the scaling to more machines can be judged (a task of 4 images must
cost well above it).

    OMP_NUM_THREADS=1 python benchmarks/bench_folder.py [--images 48] [--model default]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from napari_vlsm.core.images.imageio import list_images  # noqa: E402
from napari_vlsm.core.inference.cluster import TASK_SIZE, local_cluster, segment_on_cluster, threads_per_worker  # noqa: E402
from napari_vlsm.core.inference.folder_labeling import segment_files  # noqa: E402
from napari_vlsm.core.inference.predictor import Predictor  # noqa: E402
from napari_vlsm.core.models.loading import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run(outcomes) -> int:
    return sum(o.status == "ok" for o in outcomes)


def masks(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--folder", default=str(DATA / "kvasir_seg" / "images"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default="polyp")
    args = ap.parse_args()
    import torch
    from distributed import Client

    work = Path(tempfile.mkdtemp())
    frames = work / "frames"
    frames.mkdir()
    for p in list_images([Path(args.folder)])[:args.images]:
        shutil.copy(p, frames / p.name)
    files = list_images([frames])
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"Machine: {machine()}; {len(files)} images from {args.folder}; model {args.model}; prompt {args.prompt!r}")
    predictor = Predictor(load_model(args.model, device="cpu"))
    run(segment_files(predictor, files[:2], [args.prompt], work / "warmup"))
    rows, reference = [], None

    def arm(name, outcomes_of):
        nonlocal reference
        out = work / name.replace(" ", "_").replace(":", "")
        t = time.perf_counter()
        ok = run(outcomes_of(out))
        seconds = time.perf_counter() - t
        got = masks(out)
        reference = reference or got
        rows.append((name, ok, seconds, got == reference))

    arm("single process, no thread pool",
        lambda out: segment_files(predictor, files, [args.prompt], out, io_threads=1))
    arm("single process (shipped: thread pool)", lambda out: segment_files(predictor, files, [args.prompt], out))
    overhead = {}
    for n in (1, 2):
        with local_cluster(n) as cluster, Client(cluster) as client:
            run(segment_on_cluster(client, args.model, files[:2 * n], [args.prompt], work / f"warm{n}",
                                   threads=threads_per_worker(n)))  # each worker loads the model first
            arm(f"--cluster local:{n}", lambda out: segment_on_cluster(client, args.model, files, [args.prompt], out,
                                                                         threads=threads_per_worker(n)))
            if n == 1:
                t = time.perf_counter()
                client.gather(client.map(lambda i: i, range(200), pure=False))
                overhead["task"] = (time.perf_counter() - t) / 200
    base = rows[0][2] / max(rows[0][1], 1)
    print()
    print("| arm | images | seconds | images / s | speed vs single process | same masks |")
    print("|---|---|---|---|---|---|")
    for name, ok, seconds, same in rows:
        print(f"| {name} | {ok} | {seconds:.1f} | {ok / seconds:.2f} | {base / (seconds / max(ok, 1)):.2f}x | "
              f"{'yes' if same else 'NO'} |")
    print(f"\nPer-task overhead of the LocalCluster (200 empty tasks, one worker): {overhead['task'] * 1000:.1f} ms; "
          f"a task holds {TASK_SIZE} images ({rows[0][2] / max(rows[0][1], 1) * TASK_SIZE * 1000:.0f} ms of work here).")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
