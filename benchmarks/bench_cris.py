"""What CRIS costs: a full forward at 416 against a new prompt on an image already encoded.

A random CRIS of the release shape (CLIP RN50, medvlsm's cris.yaml) is built in memory;
random weights cost the same time as trained ones.

    OMP_NUM_THREADS=1 python benchmarks/bench_cris.py                 # one CPU thread
    python benchmarks/bench_cris.py --threads 0 --out benchmarks/results/cris.txt

Rows: (a) the benchmark's forward, image encoder + text + decoder, one image and one
prompt; (b) a new prompt on the cached image features: text encoder + decoder; (c) a
prompt seen before on the cached image: the decoder alone (the predictor caches text rows
too); and the same through ``Predictor`` (set_image + predict, then predict again).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, timed  # noqa: E402

from napari_vlsm.core.models.cris.model import (  # noqa: E402
    SHAPES,
    CrisBackend,
    CrisConfig,
    CrisForImageSegmentation,
    unpack_text,
)
from napari_vlsm.core.inference.predictor import Predictor  # noqa: E402
from napari_vlsm.core.models.processors import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = CrisForImageSegmentation(CrisConfig(**SHAPES["rn50"]))
    backend = CrisBackend(module, load_tokenizer(), torch.device("cpu"), torch.float32, "random rn50")
    n_params = sum(p.numel() for p in module.parameters()) / 1e6
    pixels = backend.preprocess([(np.random.default_rng(0).random((416, 416, 3)) * 255).astype(np.uint8)])
    prompts = iter(f"one small pink circle polyp number {i}" for i in range(10_000))

    with torch.inference_mode():
        feats = backend.encode_image(pixels)
        text = backend.encode_text(["polyp"])
        full = timed(lambda: backend.decode(backend.encode_image(pixels), backend.encode_text([next(prompts)])),
                     args.reps)
        image = timed(lambda: backend.encode_image(pixels), args.reps)
        reprompt = timed(lambda: backend.decode(feats, backend.encode_text([next(prompts)])), args.reps)
        cached = timed(lambda: backend.decode(feats, text), args.reps)
        # where the per-prompt time goes
        words, pad_mask, state = unpack_text(text, module.config.context_length, module.config.text_width)
        fq = module.neck.fuse(feats, state)
        fuse = timed(lambda: module.neck.fuse(feats, state), args.reps)
        b, c, h, w = fq.shape
        vl = timed(lambda: module.decoder(fq, words, pad_mask), args.reps)
        fq = module.decoder(fq, words, pad_mask).reshape(b, c, h, w)
        proj = timed(lambda: module.proj(fq, state), args.reps)
        image_mib = sum(f.numel() * f.element_size() for f in feats) / 2**20
        text_kib = text.numel() * text.element_size() / 2**10

    image_np = (np.random.default_rng(1).random((512, 640, 3)) * 255).astype(np.uint8)
    predictor = Predictor(backend)

    def first():
        predictor.set_image(image_np)
        predictor.predict([next(prompts)])

    first_s = timed(first, args.reps)
    again_s = timed(lambda: predictor.predict([next(prompts)]), args.reps)

    rows = [("(a) full forward: image encoder + text + decoder", full),
            ("    of which the image encoder (RN50 + the neck's image-only convs)", image),
            ("(b) new prompt on cached image features: text + decoder", reprompt),
            ("(c) seen prompt on cached image features: decoder only", cached),
            ("    of which the neck's text fusion (f5 * state on)", fuse),
            ("    of which the vision-language transformer decoder (3 layers, 26x26 tokens)", vl),
            ("    of which the projector (upsampling convs to 104x104, dynamic kernel)", proj),
            ("Predictor: set_image + predict (512x640 image)", first_s),
            ("Predictor: predict a new prompt on the same image", again_s)]
    lines = [f"Machine: {machine()}",
             f"Model: random CRIS of the release shape (CLIP RN50, 416x416), {n_params:.1f} M parameters; "
             f"median of {args.reps}",
             f"Cached per image: {image_mib:.1f} MiB of features; per prompt: a {text_kib:.0f} KiB text row", "",
             "| path | seconds | full forward / this |", "|---|---|---|"]
    lines += [f"| {name} | {s:.3f} | {full / s:.2f}x |" for name, s in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
