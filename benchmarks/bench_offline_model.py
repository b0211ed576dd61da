"""The embedded offline model against its bar: Dice on the Kvasir-SEG and CVC-ClinicDB val
splits for prompt types p1-p9, mean predicted area for prompts of absent things, CPU
latency for a 256x256 frame (first prompt and re-prompt), and its size in the package.

    python benchmarks/bench_offline_model.py [--model default] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import machine, timed  # noqa: E402

from napari_vlsm.core.data import benchmark_examples  # noqa: E402
from napari_vlsm.core.loading import load_model, resolve_folder  # noqa: E402
from napari_vlsm.core.metrics import dice, iou  # noqa: E402
from napari_vlsm.core.predictor import Predictor  # noqa: E402
from napari_vlsm.core.prompts import pick_prompt  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TYPES = [f"p{i}" for i in range(1, 10)]
ABSENT = ["skin lesion", "breast tumor", "foot ulcer", "lung opacity"]


def evaluate_set(pred: Predictor, name: str):
    rng = random.Random(0)
    d = {t: [] for t in TYPES}
    j = {t: [] for t in TYPES}
    area = {a: [] for a in ABSENT}
    for ex in benchmark_examples(DATA / name, "val"):
        image, truth = ex.load()
        prompts = [pick_prompt({"prompts": ex.prompts}, t, rng) for t in TYPES] + ABSENT
        pred.set_image(image)
        masks = pred.predict(prompts).masks
        for t, m in zip(TYPES, masks):
            d[t].append(dice(m, truth))
            j[t].append(iou(m, truth))
        for a, m in zip(ABSENT, masks[len(TYPES):]):
            area[a].append(m.mean())
    return ({t: np.mean(v) for t, v in d.items()}, {t: np.mean(v) for t, v in j.items()},
            {a: np.mean(v) for a, v in area.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load_model(args.model, device="cpu")
    pred = Predictor(backend)
    print(f"Machine: {machine()}")
    print(f"Model: {args.model} ({backend.name}, {sum(p.numel() for p in backend.module.parameters()) / 1e6:.2f} M "
          f"parameters)\n")
    results = {name: evaluate_set(pred, name) for name in ("kvasir_seg", "clinicdb")}
    print("| val split | " + " | ".join(TYPES) + " |")
    print("|---|" + "---|" * len(TYPES))
    for name, (d, j, _) in results.items():
        print(f"| {name} Dice | " + " | ".join(f"{d[t]:.3f}" for t in TYPES) + " |")
        print(f"| {name} IoU | " + " | ".join(f"{j[t]:.3f}" for t in TYPES) + " |")
    print("\nMean predicted area (fraction of the image) for prompts of absent things, polyp val images:\n")
    print("| prompt | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for a in ABSENT:
        print(f"| {a} | " + " | ".join(f"{results[n][2][a]:.4f}" for n in results) + " |")
    true_area = np.mean([ex.load()[1].mean() for ex in benchmark_examples(DATA / "kvasir_seg", "val")])
    print(f"| (true polyp area, kvasir val) | {true_area:.4f} | |")

    image = benchmark_examples(DATA / "kvasir_seg", "val")[0].load()[0]
    words = iter([f"polyp number {i}" for i in range(1000)])
    first = timed(lambda: (pred.set_image(image), pred.predict("polyp")), reps=20, warmup=3)
    pred.set_image(image)
    again = timed(lambda: pred.predict(next(words)), reps=20, warmup=3)
    folder = resolve_folder(args.model)
    size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    print(f"\nCPU latency, 256x256 frame, {torch.get_num_threads()} threads (median of 20): first prompt "
          f"{first * 1e3:.1f} ms, re-prompt {again * 1e3:.1f} ms ({first / again:.1f}x faster)")
    print(f"Size in the package: {size:.1f} MiB ({folder})")


if __name__ == "__main__":
    main()
