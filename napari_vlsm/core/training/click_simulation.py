"""Simulated annotators for training a model that takes clicks and a box (RITM, SimpleClick).

For part of each batch, the images that show their object get guidance as an annotator would
give it: a first positive click well inside the object, or a box around it (jittered) with or
without that click; then up to ``iterations`` rounds in which the model's own prediction
(without gradients) is shown as the previous result and the next click goes to the centre of
the larger error region (the maximum of its distance transform), positive on a missed part,
negative on a false one. Part of these images are asked with the empty prompt "" (the
benchmark's p0: "the thing I click, whatever it is"). Half of those that keep their prompt get
no first click or box: their clicks correct the text's own answer, as an annotator refines a
proposal (one round at least). The other images get no guidance, so
the text-only skill keeps being trained by the same network.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_vlsm.core.images.guidance import GUIDANCE_CHANNELS, Click, draw_guidance
from napari_vlsm.core.images.threshold import binarize

BOX_SHARE = 0.3        # guided images given a box
BOX_JITTER = 0.1       # each side of the box moves by up to this share of its size
EMPTY_PROMPT_SHARE = 0.5  # guided images asked with "" instead of their prompt
REFINE_SHARE = 0.5     # of the others: no first click or box; the clicks correct the text's own answer


def first_click(mask: np.ndarray, rng: random.Random) -> Click | None:
    """A positive click at a random pixel well inside the object (at least half as deep as
    its deepest point, as a person clicks the middle rather than the rim)."""
    if not mask.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(depth >= 0.5 * depth.max())
    i = rng.randrange(len(rows))
    return Click(float(rows[i]), float(cols[i]), True)


def next_click(mask: np.ndarray, pred: np.ndarray) -> Click | None:
    """The click a careful annotator makes next: at the centre of the larger error region,
    positive where the object was missed, negative where something else was taken."""
    missed, false = mask & ~pred, pred & ~mask
    region = missed if missed.sum() >= false.sum() else false
    if not region.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(depth.argmax()), depth.shape)
    return Click(float(r), float(c), bool(region is missed))


def jittered_box(mask: np.ndarray, rng: random.Random) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    dh, dw = BOX_JITTER * (r1 - r0), BOX_JITTER * (c1 - c0)
    h, w = mask.shape
    return (max(0.0, r0 + rng.uniform(-dh, dh)), max(0.0, c0 + rng.uniform(-dw, dw)),
            min(float(h), r1 + rng.uniform(-dh, dh)), min(float(w), c1 + rng.uniform(-dw, dw)))


@contextmanager
def _evaluating(module: torch.nn.Module):
    """Eval mode (batch-norm running statistics used, not updated) for the simulated
    annotator's predictions, then each submodule's mode as it was."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def simulate_guidance(backend, pixels: torch.Tensor, target: torch.Tensor, prompts: list[str], rows: list[int],
                      rng: random.Random, iterations: int) -> torch.Tensor:
    """Guidance maps (B, GUIDANCE_CHANNELS, h, w) for the batch: zero except for ``rows``,
    which get clicks or a box and up to ``iterations`` rounds of corrective clicks from the
    model's own predictions. ``prompts`` of some guided rows become "" (in place)."""
    b, h, w = target.shape
    guidance = torch.zeros((b, GUIDANCE_CHANNELS, h, w), dtype=pixels.dtype, device=pixels.device)
    if not rows:
        return guidance
    masks = target[rows].bool().cpu().numpy()
    clicks: list[list[Click]] = []
    boxes = []
    rounds = []  # corrective clicks per row: 0 to ``iterations``, at least one where the text is refined
    for j, mask in zip(rows, masks):
        if rng.random() < EMPTY_PROMPT_SHARE:
            prompts[j] = ""
        elif iterations and rng.random() < REFINE_SHARE:  # no first click: the text's own answer is corrected
            clicks.append([])
            boxes.append(None)
            rounds.append(rng.randint(1, iterations))
            continue
        box = jittered_box(mask, rng) if rng.random() < BOX_SHARE else None
        first = first_click(mask, rng) if box is None or rng.random() < 0.5 else None
        clicks.append([first] if first else [])
        boxes.append(box)
        rounds.append(rng.randint(0, iterations))
    previous = np.zeros((len(rows), h, w), np.float32)

    def maps(ks) -> torch.Tensor:
        return torch.from_numpy(np.stack([draw_guidance((h, w), clicks[k], boxes[k], previous[k]) for k in ks]))

    module = backend.module
    for it in range(max(rounds)):
        # each row's state after its own number of rounds: rows whose rounds are done stay as they are
        live = [k for k, n in enumerate(rounds) if n > it]
        with torch.no_grad(), _evaluating(module):
            sub = pixels[[rows[k] for k in live]]
            text = backend.encode_text([prompts[rows[k]] for k in live])
            guide = maps(live).to(sub.device, sub.dtype)
            logits = backend.decode(backend.encode_image(sub, guide), text).float()
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        probs = torch.sigmoid(logits).cpu().numpy()
        for k, p in zip(live, probs):
            previous[k] = p
            click = next_click(masks[k], binarize(p))
            if click:
                clicks[k].append(click)
    guidance[rows] = maps(range(len(rows))).to(guidance.device, guidance.dtype)
    return guidance


def guided_rows(target: torch.Tensor, share: float, rng: random.Random) -> list[int]:
    """The rows that show their object, each with probability ``share``."""
    shows = target.flatten(1).any(1).tolist()
    return [j for j in range(len(shows)) if shows[j] and rng.random() < share]

