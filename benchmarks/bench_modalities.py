"""Models side by side on every val split of ../shared/data, one class prompt per target (issue 43).

For each model (default: the embedded default and the two-modality default of git history,
``git:fbd9375``), in the same run:

1. Dice per val target with its class prompt, as a person asks it: on the images that show the
   target, and the share of images without it (BUSI normal, polyp-free frames, the non-COVID
   and normal X-rays asked for the infection) that get a false mask over 1% of the image;
2. for the first model, the cross table: each class prompt on the val images of every other
   modality (and lungs / infection against each other on the X-rays): the share of images with a
   mask over 1% of the image.

    python benchmarks/bench_modalities.py [--models default git:fbd9375] [--limit 0] [--threads 2]
        [--out benchmarks/results/modalities/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import TWO_MODALITY_DEFAULT, machine, model_from_git  # noqa: E402

from napari_vlsm.core.data.training_sets import benchmark_examples  # noqa: E402
from napari_vlsm.core.images.metrics import dice  # noqa: E402
from napari_vlsm.core.inference.predictor import Predictor  # noqa: E402
from napari_vlsm.core.models.loading import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FOUND = 0.01
# val kind -> (class prompt, modality)
TARGETS = {"kvasir_seg": ("polyp", "colonoscopy"), "clinicdb": ("polyp", "colonoscopy"),
           "bkai_polyp": ("polyp", "colonoscopy"), "colonoscopy_negatives": ("polyp", "colonoscopy"),
           "busi": ("Tumor in the breast ultrasound image.", "breast ultrasound"),
           "isic": ("skin melanoma", "dermoscopy"), "chest_xray:lungs": ("lungs", "chest X-ray"),
           "chest_xray:covid-19 lung infection": ("COVID-19 lung infection", "chest X-ray"),
           "fetal_head": ("fetal head", "fetal ultrasound")}
PROMPTS = list(dict.fromkeys(p for p, _ in TARGETS.values()))


def score(pred: Predictor, limit: int) -> dict:
    """Per kind: Dice on images with the target, false-mask share on those without; per (prompt,
    kind): the share of images where that prompt draws a mask (every prompt asked of every image)."""
    dices, false, drawn = defaultdict(list), defaultdict(list), defaultdict(list)
    folders = list(dict.fromkeys(k.split(":")[0] for k in TARGETS))
    for folder in folders:
        rows = benchmark_examples(DATA / folder, "val")
        by_image = defaultdict(list)
        for ex in rows:
            by_image[ex.name].append(ex)
        for n, (name, exs) in enumerate(by_image.items()):
            if limit and n >= limit:
                break
            pairs = [ex.load() for ex in exs]
            pred.set_image(pairs[0][0])
            masks = dict(zip(PROMPTS, pred.predict(PROMPTS).masks))
            for ex, (_, truth) in zip(exs, pairs):
                prompt = TARGETS[ex.kind][0]
                if truth.any():
                    dices[ex.kind].append(dice(masks[prompt], truth))
                else:
                    false[ex.kind].append(masks[prompt].mean() > FOUND)
            kinds = {ex.kind for ex in exs}
            own = {TARGETS[k][0] for k in kinds}
            shows = {TARGETS[ex.kind][0] for ex, (_, truth) in zip(exs, pairs) if truth.any()}
            for prompt in PROMPTS:
                if prompt not in own or prompt not in shows:  # another class, or this class where it is absent
                    drawn[(prompt, folder)].append(masks[prompt].mean() > FOUND)
    return {"dice": {k: float(np.mean(v)) for k, v in dices.items()},
            "n": {k: len(v) for k, v in dices.items()},
            "false": {k: float(np.mean(v)) for k, v in false.items()},
            "n_false": {k: len(v) for k, v in false.items()},
            "drawn": {f"{p} | {f}": float(np.mean(v)) for (p, f), v in drawn.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["default", TWO_MODALITY_DEFAULT])
    ap.add_argument("--limit", type=int, default=0, help="images per folder (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for spec in args.models:
        results[spec] = score(Predictor(load_model(model_from_git(spec), device="cpu")), args.limit)
        print(spec, json.dumps(results[spec]["dice"]), flush=True)
    print(f"\nMachine: {machine()}\n")
    print("Dice on the val images that show the target, with its class prompt (threshold 0.5, image size); "
          "false: share of the val images without it that get a mask over 1%:\n")
    print("| val target | prompt | n | " + " | ".join(args.models) + " |")
    print("|---|---|---|" + "---|" * len(args.models))
    for kind, (prompt, _) in TARGETS.items():
        first = results[args.models[0]]
        if kind in first["n"]:
            cells = [f"{results[m]['dice'].get(kind, float('nan')):.3f}" for m in args.models]
            print(f"| {kind} | {prompt} | {first['n'][kind]} | " + " | ".join(cells) + " |")
        if kind in first["n_false"]:
            cells = [f"{results[m]['false'].get(kind, float('nan')):.2f}" for m in args.models]
            print(f"| {kind}, without it (false) | {prompt} | {first['n_false'][kind]} | " + " | ".join(cells) + " |")
    drawn = results[args.models[0]]["drawn"]
    folders = list(dict.fromkeys(k.split(" | ")[1] for k in drawn))
    print(f"\n{args.models[0]}: share of val images where a class prompt draws a mask over 1%, on images where "
          "that class is absent:\n")
    print("| prompt | " + " | ".join(folders) + " |")
    print("|---|" + "---|" * len(folders))
    for prompt in PROMPTS:
        print(f"| {prompt} | " + " | ".join(f"{drawn[f'{prompt} | {f}']:.2f}" if f"{prompt} | {f}" in drawn else "-"
                                           for f in folders) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "models": args.models, "results": results}, indent=1))


if __name__ == "__main__":
    main()
