"""Peak resident memory of segmenting one very large 8-bit RGB image (set_image + one prompt
+ its mask), with the early reduction (ours) against the same pipeline without it (the
full-size image converted and resized by torch, as before). Each row runs in a fresh
process so the peaks do not mix.

    python benchmarks/bench_memory.py [--sides 12000 20000] [--model default]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import json, resource, sys, time
import numpy as np
from napari_vlsm.core.inference import predictor as P
from napari_vlsm.core.models.loading import load_model

side, model, reduce = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
if not reduce:  # the pipeline before: no early reduction
    P.shrink_for_model = lambda arr, side: arr
pred = P.Predictor(load_model(model, device="cpu"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = np.zeros((side, side, 3), np.uint8)
image[side // 3: 2 * side // 3, side // 4: side // 2] = 200
t = time.perf_counter()
pred.set_image(image)
mask = pred.predict("polyp").masks[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": time.perf_counter() - t, "peak_gib": peak,
                  "before_gib": base / 2**20, "mask": list(mask.shape)}))
"""


def run(side: int, model: str, reduce: bool) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(side), model, "1" if reduce else "0"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    from common import machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", type=int, nargs="+", default=[12000])
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    print(f"Machine: {machine()}\n")
    print("| image | pipeline | peak resident (GiB) | time (s) | ratio of peaks |")
    print("|---|---|---|---|---|")
    for side in args.sides:
        before = run(side, args.model, reduce=False)
        ours = run(side, args.model, reduce=True)
        for name, r in (("without early reduction", before), ("ours", ours)):
            if "error" in r:
                print(f"| {side}² RGB | {name} | failed: {r['error']} | | |")
                continue
            ratio = f"{before['peak_gib'] / r['peak_gib']:.2f}x" if "peak_gib" in before and name == "ours" else ""
            print(f"| {side}² RGB | {name} | {r['peak_gib']:.2f} | {r['seconds']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
