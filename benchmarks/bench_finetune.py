"""Finetuning: validation Dice per epoch and images per second on the Kvasir train split,
and training-step speed of the rd64-shaped CLIPSeg against the stock forward.

    python benchmarks/bench_finetune.py                      # FiLM-UNet from scratch, 3 epochs (CPU)
    python benchmarks/bench_finetune.py --model default --train decoder --epochs 5
    python benchmarks/bench_finetune.py --epochs 10 --clipseg-steps 20     # on a GPU

Part 1 runs the project's trainer (the same generator as the CLI and the widget) on
../shared/data/kvasir_seg (train -> val). Part 2 times training steps of a random CLIPSeg of
the CIDAS/clipseg-rd64-refined shape: the stock ``model(**inputs, labels=...)`` forward
(whose vision and text encoders run under no_grad, so only the decoder learns) against
ours in "decoder" and "full" mode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, sync  # noqa: E402

from napari_vlsm.core.training import train as T  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kvasir_seg"


def trainer_table(args):
    settings = T.TrainSettings(mode=args.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               schedule="onecycle", patience=10**6, seed=0, crop=args.crop)
    out = Path(tempfile.mkdtemp(prefix="vlsm-finetune-"))
    print(f"Trainer: {args.model}, train={args.train}, {args.epochs} epochs, batch {args.batch_size}, "
          f"Kvasir-SEG train -> val, prompts p1-p9 (val: p1)\n")
    print("| epoch | train loss | val Dice (p1) | img/s | elapsed s |")
    print("|---|---|---|---|---|")
    for ev in T.finetune(args.model, [DATA], out, settings):
        if ev.kind == "epoch":
            print(f"| {ev.epoch} | {ev.loss:.4f} | {ev.val_dice:.4f} | {ev.images_per_s:.1f} | {ev.elapsed:.0f} |",
                  flush=True)


def stock_rate(folder, device, inputs, masks, amp, steps) -> float:
    """Images per second of training steps with the stock transformers forward (its own loss)."""
    from transformers import CLIPSegForImageSegmentation

    stock = CLIPSegForImageSegmentation.from_pretrained(folder).to(device).train()
    opt = torch.optim.AdamW([p for p in stock.parameters() if p.requires_grad], lr=1e-4)

    def stock_step():
        with torch.autocast(**amp):
            loss = stock(**inputs, labels=masks).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    return rate(stock_step, steps, len(masks))


def clipseg_steps(args):
    from napari_vlsm.core.models.loading import load_model
    from napari_vlsm.core.models.random_models import build_random_clipseg

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = build_random_clipseg(Path(tempfile.mkdtemp()) / "rd64", shape="rd64")
    b = args.clipseg_batch
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(b)]
    masks = torch.from_numpy(rng.random((b, 352, 352)) > 0.5).float().to(device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []

    backend = load_model(folder, device, "fp32")
    inputs = {"pixel_values": backend.preprocess(images), **backend.tokenize(["polyp"] * b)}
    stock = stock_rate(folder, device, inputs, masks, amp, args.clipseg_steps)
    rows.append(("stock HF forward (decoder learns)", stock))
    for mode in ("decoder", "full"):
        params = backend.trainable_parameters(mode)
        backend.module.train()
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            with torch.autocast(**amp):
                logits = backend.forward(inputs["pixel_values"], ["polyp"] * b)
                loss = T.dice_bce_loss(logits, masks)
            opt.zero_grad()
            loss.backward()
            opt.step()

        rows.append((f"ours, train={mode}", rate(step, args.clipseg_steps, b)))
    print(f"\nrd64-shaped CLIPSeg training steps, batch {b}, {args.clipseg_steps} timed steps"
          f"{' (bf16 autocast)' if device.type == 'cuda' else ' (fp32)'}\n")
    print("| path | img/s | vs stock |")
    print("|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:.2f} | {r / rows[0][1]:.2f}x |")


def rate(step, steps, batch) -> float:
    step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="new:film-unet")
    ap.add_argument("--train", default="full")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--clipseg-steps", type=int, default=3)
    ap.add_argument("--clipseg-batch", type=int, default=4)
    ap.add_argument("--skip-clipseg", action="store_true")
    args = ap.parse_args()
    print(f"Machine: {machine()}\n")
    trainer_table(args)
    if not args.skip_clipseg:
        clipseg_steps(args)


if __name__ == "__main__":
    main()
