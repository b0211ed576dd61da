"""The training loss: Dice + BCE, and a batch's loss with its negatives (prompts for absent
things against empty masks) and, for a model that takes clicks, simulated clicks and boxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_vlsm.core.models.backend import TorchBackend
from napari_vlsm.core.training.click_simulation import guided_rows, simulate_guidance


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, empty_tolerance: float = 0.0) -> torch.Tensor:
    """Mean of BCE and soft Dice loss (smooth 1, so an empty target asks for an empty mask).

    ``empty_tolerance``: on rows whose target is empty the Dice term's smoothing is that share
    of the pixels instead of 1, so a faint or tiny answer costs little there and a false mask
    of that area still costs half. With smoothing 1, a few uncertain pixels on an empty row
    cost nearly the whole term, which teaches a rare, hard target (COVID-19 infection, empty on
    two thirds of its rows) to answer nothing anywhere."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    smooth = torch.ones_like(t[:, 0])
    if empty_tolerance:
        smooth = torch.where(t.sum(1) > 0, smooth, smooth * max(1.0, empty_tolerance * t.shape[1]))
    dice = 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return bce + dice.mean()


def batch_loss(backend: TorchBackend, pixels, target, prompts, settings, rng, negatives=None, batch=()) -> torch.Tensor:
    """Dice+BCE on the batch, plus the same on some of its images decoded again with prompts
    for absent things (drawn by ``negatives`` for the examples ``batch``) against empty masks.

    For a model that takes clicks, the guided rows are drawn first from the whole batch; the
    negative rows are the first unguided ones (clicks on the object would contradict an empty
    answer), so a large negative share no longer leaves no rows for clicks."""
    rows: list[int] = []
    if settings.guidance_share and backend.takes_clicks:  # clicks and boxes, as an annotator gives them
        rows = guided_rows(target, settings.guidance_share, rng)
        guidance = simulate_guidance(backend, pixels, target, prompts, rows, rng, settings.click_iterations)
        feats = backend.encode_image(pixels, guidance)
    else:
        feats = backend.encode_image(pixels)
    n_neg = min(int(round(len(prompts) * settings.negative_fraction)), len(batch)) if negatives else 0
    guided = set(rows)
    neg_rows = [j for j in range(min(len(prompts), len(batch))) if j not in guided][:n_neg]
    text = backend.encode_text(prompts)
    if neg_rows:
        # Negatives go through the decoder in the same pass as the positives, so batch-norm
        # statistics see the same mixture in training as the running statistics hold later.
        neg = backend.encode_text([negatives.draw(batch[j], rng) for j in neg_rows])
        feats = [torch.cat([f, f[neg_rows]]) for f in feats]
        text = torch.cat([text, neg])
        target = torch.cat([target, torch.zeros_like(target[neg_rows])])
    logits = backend.decode(feats, text)
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    n = len(prompts)
    loss = dice_bce_loss(logits[:n], target[:n], settings.empty_tolerance)
    if neg_rows:
        loss = loss + settings.negative_fraction * dice_bce_loss(logits[n:], target[n:], settings.empty_tolerance)
    return loss
