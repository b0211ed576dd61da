"""Clicks and a box on benchmark-format folders, by the RITM / SimpleClick protocol (issue 42).

For each image of a folder's split that shows its object (chest_xray: each target's rows),
a simulated annotator clicks: each click at the centre of the larger error region of the
current result (the deepest point of the object for a first click on nothing), positive on a
missed part, negative on a false one, up to ``--clicks`` (20), the previous result passed back
each time. Arms, in the same run:

- ``text``: the row's p1 prompt alone (no clicks);
- ``text+clicks``: p1, then clicks starting from the text result;
- ``""+clicks``: the empty prompt (p0: "the thing I click"), clicks from nothing;
- ``box``: the object's bounding box alone with the empty prompt;
- baselines: an ellipse inscribed in the same box; scikit-image's random walker seeded with the
  ``""+clicks`` arm's own clicks (positive = object, negative and the image border = background).

Reported per folder: Dice after 1, 3, 5, 10 and 20 clicks; NoC@85 and NoC@90 (clicks until IoU
reaches 0.85 / 0.90, 20 when never), the median time of one click (the model's refinement,
image encoder cached: what the plugin does per click).

    python benchmarks/bench_clicks.py ../shared/data/kvasir_seg [...] [--model default] [--limit 20]
        [--split val] [--threads 2] [--out benchmarks/results/clicks/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine  # noqa: E402

from napari_vlsm.core.data.training_sets import benchmark_examples  # noqa: E402
from napari_vlsm.core.images.metrics import dice  # noqa: E402
from napari_vlsm.core.inference.predictor import Predictor  # noqa: E402
from napari_vlsm.core.models.loading import load_model  # noqa: E402
from napari_vlsm.core.training.click_simulation import next_click  # noqa: E402

REPORT_AT = (1, 3, 5, 10, 20)
RW_AT = (1, 3, 5)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def inscribed_ellipse(shape, box) -> np.ndarray:
    r0, c0, r1, c1 = box
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    cy, cx, ry, rx = (r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2, max((r1 - r0) / 2, 0.5), max((c1 - c0) / 2, 0.5)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def random_walker_mask(image: np.ndarray, clicks) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.segmentation import random_walker

    grey = rgb2gray(image) if image.ndim == 3 else image.astype(float) / 255
    seeds = np.zeros(grey.shape, np.int32)
    seeds[0, :] = seeds[-1, :] = seeds[:, 0] = seeds[:, -1] = 2  # the border is background
    for r, c, positive in clicks:
        rr, cc = int(round(r)), int(round(c))
        seeds[max(rr - 2, 0):rr + 3, max(cc - 2, 0):cc + 3] = 1 if positive else 2
    return random_walker(grey, seeds, beta=130, mode="cg_j") == 1


def click_series(pred: Predictor, prompt: str, truth: np.ndarray, start: np.ndarray | None, n: int):
    """Dice and IoU after each of ``n`` clicks, the clicks made, and each click's seconds."""
    clicks, dices, ious, seconds = [], [], [], []
    probs = start
    current = start >= 0.5 if start is not None else np.zeros_like(truth)
    for _ in range(n):
        click = next_click(truth, current)
        if click is not None:
            clicks.append((click.row, click.col, click.positive))
        t = time.perf_counter()
        probs = pred.predict(prompt, clicks=clicks, previous=probs).probs[0]
        seconds.append(time.perf_counter() - t)
        current = probs >= 0.5
        dices.append(dice(current, truth))
        ious.append(iou(current, truth))
    return dices, ious, clicks, seconds


def noc(ious: list[float], level: float, cap: int) -> int:
    return next((i + 1 for i, v in enumerate(ious) if v >= level), cap)


def bench_folder(pred: Predictor, folder: Path, split: str, limit: int, n_clicks: int, rw: bool) -> dict:
    rows = [ex for ex in benchmark_examples(folder, split)]
    out = {k: [] for k in ("text", "box", "ellipse", "noc85_text", "noc90_text", "noc85_empty", "noc90_empty",
                           "seconds")}
    series = {"text+clicks": [], '""+clicks': [], "random walker": []}
    taken = 0
    for ex in rows:
        if taken >= limit:
            break
        image, truth = ex.load()
        if not truth.any():
            continue
        taken += 1
        prompt = ex.prompts.get("p1") or ""
        pred.set_image(image)
        text = pred.predict(prompt).probs[0]
        out["text"].append(dice(text >= 0.5, truth))
        d, i, _, s = click_series(pred, prompt, truth, text, n_clicks)
        series["text+clicks"].append(d)
        out["noc85_text"].append(noc(i, 0.85, n_clicks))
        out["noc90_text"].append(noc(i, 0.90, n_clicks))
        out["seconds"] += s
        d, i, clicks, s = click_series(pred, "", truth, None, n_clicks)
        series['""+clicks'].append(d)
        out["noc85_empty"].append(noc(i, 0.85, n_clicks))
        out["noc90_empty"].append(noc(i, 0.90, n_clicks))
        out["seconds"] += s
        box = bounding_box(truth)
        out["box"].append(dice(pred.predict("", box=box).masks[0], truth))
        out["ellipse"].append(dice(inscribed_ellipse(truth.shape, box), truth))
        if rw:
            series["random walker"].append([dice(random_walker_mask(image, clicks[:k]), truth) for k in RW_AT])
    if not taken:
        return {}
    summary = {"images": taken, "text": float(np.mean(out["text"])), "box": float(np.mean(out["box"])),
               "ellipse in box": float(np.mean(out["ellipse"])),
               "median click ms": 1000 * statistics.median(out["seconds"]) if out["seconds"] else None}
    for arm in ("text+clicks", '""+clicks'):
        mean = np.mean(series[arm], axis=0)
        summary[arm] = {k: float(mean[k - 1]) for k in REPORT_AT if k <= n_clicks}
    summary["NoC@85 text"], summary["NoC@90 text"] = float(np.mean(out["noc85_text"])), float(np.mean(out["noc90_text"]))
    summary['NoC@85 ""'], summary['NoC@90 ""'] = float(np.mean(out["noc85_empty"])), float(np.mean(out["noc90_empty"]))
    if rw and series["random walker"]:
        mean = np.mean(series["random walker"], axis=0)
        summary["random walker"] = {k: float(v) for k, v in zip(RW_AT, mean)}
    return summary


def table(results: dict) -> str:
    head = ("| set | n | text | text+1 | text+5 | \"\"+1 | \"\"+3 | \"\"+5 | \"\"+20 | NoC@85 \"\" | NoC@90 \"\" | "
            "NoC@90 text | box | ellipse | RW+1 | RW+5 | ms/click |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        e, t, rw = r['""+clicks'], r["text+clicks"], r.get("random walker", {})
        cells = [name, r["images"], r["text"], t.get(1), t.get(5), e.get(1), e.get(3), e.get(5), e.get(20),
                 r['NoC@85 ""'], r['NoC@90 ""'], r["NoC@90 text"], r["box"], r["ellipse in box"], rw.get(1), rw.get(5),
                 r["median click ms"]]
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) and c <= 1.0 else
                                       f"{c:.1f}" if isinstance(c, float) else "-" if c is None else str(c)
                                       for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=20, help="images with their object per folder")
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--no-random-walker", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pred = Predictor(load_model(args.model, device="cpu"))
    if not pred.takes_clicks:
        sys.exit(f"{args.model} takes text prompts only; clicks need a model that takes them (the default).")
    results = {}
    for folder in args.folders:
        found = bench_folder(pred, folder, args.split, args.limit, args.clicks, not args.no_random_walker)
        if found:  # a folder without any image of its object (polyp-free frames) has nothing to click
            results[folder.name] = found
            print(folder.name, json.dumps(found), flush=True)
    print(f"\nModel {args.model}; {args.split} split, up to {args.limit} images with their object per set; "
          f"{machine()}\n")
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "machine": machine(), "split": args.split,
                                        "limit": args.limit, "results": results}, indent=1))


if __name__ == "__main__":
    main()
