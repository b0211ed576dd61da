"""How long the napari window stalls when a result of a very large image is written into a
Labels layer and when the threshold slider is released, and the peak memory of the whole
plugin path, in a real viewer with the segmentation dock (under Xvfb).

The stall is measured as a user feels it: a timer ticks every 10 ms on the GUI thread and
the longest gap between ticks is reported. "before" is the plugin as it was (thresholding
by argmax over the prompts, the label lookup, a new layer filled through data_setitem (an
undo entry with index arrays of every labelled pixel), copies of the plane before and after,
all on the GUI thread); "ours"
works the plane out in a worker (one comparison for a single prompt, argmax in bands of rows
for several) and only writes it on the GUI thread. One prompt, the embedded default model. Each row runs in a fresh process, so peaks do not mix.

    xvfb-run -a python benchmarks/bench_label_write.py [--sides 8000 12000] [--model default]
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
import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication
from napari_vlsm.plugin import label_writing
from napari_vlsm.plugin.segment_widget import SegmentWidget

side, model, arm = int(sys.argv[1]), sys.argv[2], sys.argv[3]
viewer = napari.Viewer(show=True)
widget = SegmentWidget(viewer)
viewer.window.add_dock_widget(widget)
widget.add_model(model)
image = np.zeros((side, side, 3), np.uint8)
image[side // 3: 2 * side // 3, side // 4: side // 2] = 200
viewer.add_image(image, name="big")
widget.prompt_edit.setPlainText("polyp")
if arm == "gui":  # as the plugin did before: thresholding with argmax, on the GUI thread
    import hashlib

    def combine_before(probs, value):
        probs = probs[None] if probs.ndim == 2 else probs
        labels = (probs.argmax(axis=0) + 1).astype(np.uint8)
        labels[probs.max(axis=0) < value] = 0
        return labels

    label_writing.combine_labels = combine_before
    label_writing.to_labels = lambda choice, values, dtype: np.array([0] + list(values), dtype=dtype)[choice]
    label_writing.digest = lambda a: hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).digest()
    held = []  # the plane before and the plane written, which the write kept as copies

    def write_before(viewer, image_layer, target, choices, prompts, threshold, mode, keep=None):
        target = label_writing.new_labels_layer(viewer, image_layer, label_writing.layer_name(image_layer, prompts))
        values = list(range(1, len(prompts) + 1))
        (index, choice), = choices.items()
        held.append(label_writing.plane(target, index).copy())
        label_writing.write_plane(target, index, label_writing.to_labels(choice, values, target.data.dtype))
        held.append(label_writing.plane(target, index).copy())
        label_writing.set_label_names(target, dict(zip(values, prompts)))
        label_writing.use_bright_colours(target, values)
        written = label_writing.digest(held[-1])
        return target, label_writing.LabelWrite(target, index, "replace", values, held[-2], target.data.dtype,
                                                written, None, {written: threshold})

    label_writing.write_result = write_before
    session_segment = widget.session.segment
    def segment_unthresholded(*args):
        return (yield from session_segment(*args[:-1], -1.0))
    widget.session.segment = segment_unthresholded

last, gaps = [time.perf_counter()], []
def tick():
    now = time.perf_counter()
    gaps.append(now - last[0])
    last[0] = now
timer = QTimer()
timer.timeout.connect(tick)
timer.start(10)

def wait(until):
    while not until():
        QApplication.processEvents()
        time.sleep(0.002)
    for _ in range(20):  # let the write's redraw happen
        QApplication.processEvents()
        time.sleep(0.01)

widget.run()
wait(lambda: widget.worker is None)
viewer.layers.remove(viewer.layers[-1])  # the first run loaded the model; the second is timed
gaps.clear(); last[0] = time.perf_counter()
widget.run()
wait(lambda: widget.worker is None)
write_stall = max(gaps)  # the write is the only GUI-thread work of a run
gaps.clear(); last[0] = time.perf_counter()
if arm == "gui":
    write = widget.session.last_write
    planned = label_writing.plan_threshold(write, widget.session.last.probs[write.index], 0.3)
    label_writing.rethreshold(write, planned, 0.3)
    tick()
else:
    widget.threshold.setValue(30)
    wait(lambda: widget.thresholding is None)
threshold_stall = max(gaps)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"write_s": write_stall, "threshold_s": threshold_stall, "peak_gib": peak}))
"""


def run(side: int, model: str, arm: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    res = subprocess.run([sys.executable, "-c", CHILD, str(side), model, arm], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    from common import machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", type=int, nargs="+", default=[8000, 12000])
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    print(f"Machine: {machine()}\n")
    print("| image | thresholding | longest stall, result written (s) | longest stall, slider released (s) "
          "| peak resident (GiB) | stall ratio (write, slider) |")
    print("|---|---|---|---|---|---|")
    for side in args.sides:
        base = run(side, args.model, "gui")
        ours = run(side, args.model, "worker")
        for name, r in (("before: all on the GUI thread", base), ("ours: in a worker", ours)):
            if "error" in r:
                print(f"| {side}² RGB | {name} | failed: {r['error']} | | | |")
                continue
            ratio = ""
            if r is ours and "error" not in base:
                ratio = f"{base['write_s'] / r['write_s']:.1f}x, {base['threshold_s'] / r['threshold_s']:.1f}x"
            print(f"| {side}² RGB | {name} | {r['write_s']:.2f} | {r['threshold_s']:.2f} | {r['peak_gib']:.2f} "
                  f"| {ratio} |")


if __name__ == "__main__":
    main()
