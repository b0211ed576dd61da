"""The embedded default model against its bar, on the val splits of ../shared/data:

1. Dice per data set x prompt type p1-p9 (the benchmark's layout; BUSI's normal images have
   empty masks and their own p1, "No tumor in the breast ultrasound image.");
   and Dice with one class prompt on every image of a set ("polyp"; "Tumor in the breast
   ultrasound image." on normal images too), as a person would ask;
2. cross-prompt table: each class's prompts (the benchmark's own and short forms a person
   would type, some never trained) on each data set's images: the share of frames that get
   a mask over 1% of the image;
3. the polyp-free rate: polyp-free colonoscopy frames where "polyp" draws a mask over 1%;
4. size in the package and CPU latency for a 256x256 frame (first prompt, re-prompt), with one
   view and with the mirror.

    python benchmarks/bench_offline_model.py [--model default] [--threads 2] [--flip model|on|off]

``--flip``: average each answer with the mirrored image's (on), not (off), or as the model's
config says (model, the default: what the CLI and the plugin do). Latency is measured both
ways in the same run.
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

from napari_vlsm.core.models.loading import load_model, resolve_folder  # noqa: E402
from napari_vlsm.core.images.metrics import dice  # noqa: E402
from napari_vlsm.core.inference.predictor import Predictor  # noqa: E402
from napari_vlsm.core.data.prompts import TRAIN_PROMPT_TYPES, pick_prompt  # noqa: E402
from napari_vlsm.core.data.training_sets import benchmark_examples  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TYPES = list(TRAIN_PROMPT_TYPES)
POSITIVE_SETS = ["kvasir_seg", "clinicdb", "bkai_polyp", "busi"]
ALL_SETS = POSITIVE_SETS + ["colonoscopy_negatives"]
# (class, prompt, trained?): the short forms marked False never appeared in training
CROSS = [("polyp", "polyp", True), ("polyp", "colon polyp", True), ("polyp", "adenoma in the colon", False),
         ("tumour", "Tumor in the breast ultrasound image.", True), ("tumour", "breast tumor", True),
         ("tumour", "lesion in the breast", True), ("tumour", "breast cancer", False),
         ("tumour", "hypoechoic mass in the breast", False),
         ("absent", "skin lesion", False), ("absent", "foot ulcer", False), ("absent", "lung opacity", False),
         ("absent", "liver tumor", True), ("absent", "polyp in the nose", False)]
FOUND = 0.01  # a mask over 1% of the frame counts as "found something"
CLASS_PROMPT = {"kvasir_seg": "polyp", "clinicdb": "polyp", "bkai_polyp": "polyp",
                "busi": "Tumor in the breast ultrasound image."}


def mean_or_none(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def score_set(pred: Predictor, name: str) -> dict:
    """One pass over a set's val images, each encoded once and asked every prompt at once:
    Dice per prompt type and with the set's class prompt (all images, with the object,
    without it), and the share of frames where each cross prompt draws a mask over FOUND
    (of all frames, and of the frames whose mask is not empty)."""
    rng = random.Random(0)
    cross = [p for _, p, _ in CROSS]
    by_type = {t: [] for t in TYPES}
    by_object = {True: [], False: []}
    found, found_with_object = [], []
    for ex in benchmark_examples(DATA / name, "val"):
        image, truth = ex.load()
        types = [t for t in TYPES if ex.prompts.get(t)] if name in CLASS_PROMPT else []
        asked = [pick_prompt({"prompts": ex.prompts}, t, rng) for t in types] + (
            [CLASS_PROMPT[name]] if name in CLASS_PROMPT else [])
        pred.set_image(image)
        masks = pred.predict(asked + cross).masks
        for t, m in zip(types, masks):
            by_type[t].append(dice(m, truth))
        if name in CLASS_PROMPT:
            by_object[bool(truth.any())].append(dice(masks[len(types)], truth))
        hits = [m.mean() > FOUND for m in masks[len(asked):]]
        found.append(hits)
        if truth.any():
            found_with_object.append(hits)
    return {"n": len(found), "types": {t: mean_or_none(v) for t, v in by_type.items()},
            "class": (mean_or_none(by_object[True] + by_object[False]), mean_or_none(by_object[True]),
                      mean_or_none(by_object[False])),
            "found": dict(zip(cross, np.mean(found, axis=0))),
            "found_with_object": dict(zip(cross, np.mean(found_with_object, axis=0))) if found_with_object else {}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--flip", choices=("model", "on", "off"), default="model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load_model(args.model, device="cpu")
    pred = Predictor(backend, None if args.flip == "model" else args.flip == "on")
    print(f"Machine: {machine()}")
    print(f"Model: {args.model} ({backend.name}, {sum(p.numel() for p in backend.module.parameters()) / 1e6:.2f} M "
          f"parameters); flip averaging {'on' if pred.flip_average else 'off'} (--flip {args.flip})\n")

    scores = {name: score_set(pred, name) for name in ALL_SETS}
    print("Dice on the val splits, per prompt type (threshold 0.5, at the image's size):\n")
    print("| val split | n | " + " | ".join(TYPES) + " |")
    print("|---|---|" + "---|" * len(TYPES))
    for name in POSITIVE_SETS:
        d = scores[name]["types"]
        cells = " | ".join("-" if d[t] is None else f"{d[t]:.3f}" for t in TYPES)
        print(f"| {name} | {scores[name]['n']} | {cells} |")

    print("\nDice with one class prompt on every val image (normal BUSI images asked for the tumour too):\n")
    print("| val split | prompt | Dice, all images | images with the object | images without |")
    print("|---|---|---|---|---|")
    for name in POSITIVE_SETS:
        every, with_obj, without = scores[name]["class"]
        print(f"| {name} | {CLASS_PROMPT[name]} | {every:.3f} | {with_obj:.3f} | "
              + ("-" if without is None else f"{without:.3f}") + " |")

    print(f"\nShare of val frames with a mask over {FOUND:.0%} of the image, per prompt (✓ = trained prompt):\n")
    columns = {name: scores[name]["found"] for name in ALL_SETS}
    columns["busi (tumour images)"] = scores["busi"]["found_with_object"]
    print("| class | prompt | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for cls, prompt, trained in CROSS:
        print(f"| {cls} | {prompt}{' ✓' if trained else ''} | "
              + " | ".join(f"{columns[c][prompt]:.2f}" for c in columns) + " |")
    print(f"\nPolyp-free rate: 'polyp' draws a mask over {FOUND:.0%} on "
          f"{columns['colonoscopy_negatives']['polyp']:.1%} of the polyp-free val frames.")

    image = benchmark_examples(DATA / "kvasir_seg", "val")[0].load()[0]
    words = iter([f"polyp number {i}" for i in range(1000)])
    print(f"\nCPU latency, 256x256 frame, {torch.get_num_threads()} threads (median of 20):\n")
    print("| views | first prompt | re-prompt | ratio to one view (first / re-prompt) |")
    print("|---|---|---|---|")
    times = {}
    for flip in (False, True):
        timing = Predictor(backend, flip)
        first = timed(lambda: (timing.set_image(image), timing.predict("polyp")), reps=20, warmup=3)
        timing.set_image(image)
        again = timed(lambda: timing.predict(next(words)), reps=20, warmup=3)
        times[flip] = first, again
        ratio = f"{first / times[False][0]:.2f}x / {again / times[False][1]:.2f}x"
        print(f"| {'image + mirror' if flip else 'image'} | {first * 1e3:.1f} ms | {again * 1e3:.1f} ms | {ratio} |")
    folder = resolve_folder(args.model)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    print()
    print(f"Size in the package (weights, tokenizer, replay sample, card): {size:.1f} MiB ({folder})")


if __name__ == "__main__":
    main()
