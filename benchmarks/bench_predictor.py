"""Stock Hugging Face CLIPSeg pipeline against napari-vlsm's paths, in one run, one table.

A random CLIPSeg of the CIDAS/clipseg-rd64-refined shape (ViT-B/16, 352x352, 150.7 M
parameters) is built offline; random weights cost the same time as trained ones.

    python benchmarks/bench_predictor.py                # CPU here: small counts
    python benchmarks/bench_predictor.py --batch 64 --folder-images 512 --compile   # on a GPU

A random BiomedCLIPSeg of BiomedCLIP's shape (ViT-B/16 at 224, PubMedBERT, 196 M parameters,
made as open_clip files in the hub's layout and converted) is timed in the same run
(--no-biomedclipseg skips it); its "uncached" row runs the whole network per call, as the
benchmark's forward does.

Rows: (a) first prompt on a new image, batch 1; (b) a new prompt on the same image;
(c) throughput at --batch images per call; (d) folder labeling end to end (JPEG decode ->
masks written), images per second; peak memory. Ratios are against stock in the same run.
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
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import PeakMemory, machine, sync, timed  # noqa: E402

from napari_vlsm.core.inference.folder_labeling import segment_files  # noqa: E402
from napari_vlsm.core.images.imageio import read_image, write_mask  # noqa: E402
from napari_vlsm.core.models.loading import load_model  # noqa: E402
from napari_vlsm.core.images.postprocess import combine_labels, logits_to_probs  # noqa: E402
from napari_vlsm.core.inference.predictor import Predictor  # noqa: E402
from napari_vlsm.core.models.random_models import build_random_clipseg  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kvasir_seg" / "images"
PROMPTS = [f"one small pink circle polyp number {i}" for i in range(1000)]


class Stock:
    """What a user of transformers writes: processor + full forward, then resize back."""

    def __init__(self, folder, device, autocast=False):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        from napari_vlsm.core.models.processors import load_image_processor, load_tokenizer

        self.model = CLIPSegForImageSegmentation.from_pretrained(folder).to(device).eval()
        self.proc = CLIPSegProcessor(image_processor=load_image_processor(Path(folder), 352),
                                     tokenizer=load_tokenizer(Path(folder)))
        self.device, self.autocast = device, autocast

    @torch.inference_mode()
    def __call__(self, images, prompts):
        inputs = self.proc(text=prompts, images=images, padding=True, return_tensors="pt").to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(**inputs).logits
        return [logits_to_probs(logits[i:i + 1], im.shape[:2]) for i, im in enumerate(images)]


def stock_folder(stock, files, out, batch):
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        images = [read_image(f) for f in chunk]
        for f, probs in zip(chunk, stock(images, ["polyp"] * len(images))):
            write_mask(out / f"{f.stem}.png", combine_labels(probs))


def whole_pass_rows(run, image, images, files, out, batch):
    """The rows for a path that runs the whole network on every call (``run(images, prompts)``)."""
    counter = iter(PROMPTS)
    with PeakMemory() as mem:
        a = timed(lambda: run([image], ["polyp"]), reps=3)
        b = timed(lambda: run([image], [next(counter)]), reps=3)
        c = timed(lambda: run(images, ["polyp"] * len(images)), reps=2)
        t = time.perf_counter()
        stock_folder(run, files, out, batch)
        d = len(files) / (time.perf_counter() - t)
    return a, b, len(images) / c, d, mem.peak


def ours_rows(pred: Predictor, image, images, files, out, batch):
    counter = iter(PROMPTS)
    with PeakMemory() as mem:
        a = timed(lambda: (pred.set_image(image), pred.predict("polyp")), reps=3)
        pred.set_image(image)
        b = timed(lambda: pred.predict(next(counter)), reps=5)
        c = timed(lambda: pred.predict_batch(images, "polyp"), reps=2)
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        list(segment_files(pred, files, ["polyp"], out, batch_size=batch))
        sync()
        d = len(files) / (time.perf_counter() - t)
    return a, b, len(images) / c, d, mem.peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=0, help="images per call for (c)/(d); default 64 GPU, 4 CPU")
    ap.add_argument("--folder-images", type=int, default=0, help="images for (d); default 512 GPU, 12 CPU")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (GPU; warm-up reported)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-biomedclipseg", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (64 if cuda else 4)
    n_files = args.folder_images or (512 if cuda else 12)
    work = Path(tempfile.mkdtemp(prefix="vlsm-bench-"))
    folder = build_random_clipseg(work / "rd64", shape="rd64")
    files = sorted(DATA.glob("*.jpg"))[:n_files]
    image = read_image(files[0])
    images = [read_image(f) for f in files[:batch]]
    rows = []

    rows.append(("stock HF fp32", *whole_pass_rows(Stock(folder, device), image, images, files, work / "stock_out",
                                                   batch)))
    del_cache()
    rows.append(("ours torch eager fp32", *ours_rows(Predictor(load_model(folder, device, "fp32")), image, images,
                                                     files, work / "o1", batch)))
    del_cache()
    fast = load_model(folder, device, "bf16")
    rows.append(("ours torch bf16", *ours_rows(Predictor(fast), image, images, files, work / "o2", batch)))
    if args.compile:
        t = time.perf_counter()
        fast.module.clip.vision_model.encoder = torch.compile(fast.module.clip.vision_model.encoder)
        pred = Predictor(fast)
        pred.predict_batch(images, "polyp")
        pred.set_image(image)
        pred.predict("polyp")
        print(f"torch.compile warm-up: {time.perf_counter() - t:.1f} s")
        rows.append(("ours torch bf16 + compile", *ours_rows(pred, image, images, files, work / "o3", batch)))
    del_cache()
    if not args.no_onnx:
        from napari_vlsm.core.models.onnx_export import export

        t = time.perf_counter()
        export(load_model(folder, "cpu", "fp32"), work / "onnx")
        print(f"ONNX export: {time.perf_counter() - t:.1f} s")
        rows.append(("ours onnxruntime fp32", *ours_rows(Predictor(load_model(work / "onnx", device)), image, images,
                                                         files, work / "o4", batch)))
    if not args.no_biomedclipseg:
        rows += biomedclipseg_rows(work, device, image, images, files, batch)
    print(f"\nMachine: {machine()}")
    print(f"Models: random CLIPSeg, rd64-refined shape (352x352); random BiomedCLIPSeg, BiomedCLIP shape (224x224). "
          f"Batch {batch}; folder of {len(files)} Kvasir JPEGs.\n")
    base = rows[0]
    print("| path | (a) first prompt, ms | (b) re-prompt, ms | (c) batch img/s | (d) folder img/s | peak MiB |")
    print("|---|---|---|---|---|---|")
    for name, a, b, c, d, mem in rows:
        print(f"| {name} | {a * 1e3:.1f} ({base[1] / a:.2f}x) | {b * 1e3:.1f} ({base[2] / b:.1f}x) | "
              f"{c:.1f} ({c / base[3]:.2f}x) | {d:.1f} ({d / base[4]:.2f}x) | {mem:.0f} |")
    print("\nRatios: speed-up against the stock CLIPSeg row (higher is better).")
    shutil.rmtree(work, ignore_errors=True)


class Uncached:
    """The benchmark's way: preprocess, then image and text encoders and decoder on every call."""

    def __init__(self, backend):
        self.backend = backend

    @torch.inference_mode()
    def __call__(self, images, prompts):
        logits = self.backend.forward(self.backend.preprocess(images), prompts)
        return [logits_to_probs(logits[i:i + 1], im.shape[:2]) for i, im in enumerate(images)]


def biomedclipseg_rows(work, device, image, images, files, batch):
    from napari_vlsm.core.models.random_models import build_random_biomedclipseg

    t = time.perf_counter()
    folder = build_random_biomedclipseg(work / "biomedclipseg", "base")
    print(f"BiomedCLIPSeg: open_clip files written and converted in {time.perf_counter() - t:.1f} s")
    rows = []
    del_cache()
    uncached = Uncached(load_model(folder, device, "fp32"))
    rows.append(("BiomedCLIPSeg uncached fp32", *whole_pass_rows(uncached, image, images, files, work / "b0", batch)))
    del uncached
    for dtype in ("fp32", "bf16"):
        del_cache()
        pred = Predictor(load_model(folder, device, dtype))
        rows.append((f"ours BiomedCLIPSeg {dtype}", *ours_rows(pred, image, images, files, work / f"b{dtype}", batch)))
    return rows


def del_cache():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
