"""The training loss: Dice + BCE, and a batch's loss with its negatives (prompts for absent
things against empty masks) and, for a model that takes clicks, simulated clicks and boxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_vlsm.core.models.backend import TorchBackend
from napari_vlsm.core.training.click_simulation import guided_rows, simulate_guidance


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of BCE and soft Dice loss (smooth 1, so an empty target asks for an empty mask)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def batch_loss(backend: TorchBackend, pixels, target, prompts, settings, rng, negatives=None, batch=()) -> torch.Tensor:
    """Dice+BCE on the batch, plus the same on its first images decoded again with prompts
    for absent things (drawn by ``negatives`` for the examples ``batch``) against empty masks."""
    n_neg = min(int(round(len(prompts) * settings.negative_fraction)), len(batch)) if negatives else 0
    if settings.guidance_share and backend.takes_clicks:  # clicks and boxes, as an annotator gives them
        rows = guided_rows(target, n_neg, settings.guidance_share, rng)
        guidance = simulate_guidance(backend, pixels, target, prompts, rows, rng, settings.click_iterations)
        feats = backend.encode_image(pixels, guidance)
    else:
        feats = backend.encode_image(pixels)
    text = backend.encode_text(prompts)
    if n_neg:
        # Negatives go through the decoder in the same pass as the positives, so batch-norm
        # statistics see the same mixture in training as the running statistics hold later.
        neg = backend.encode_text([negatives.draw(ex, rng) for ex in batch[:n_neg]])
        feats = [torch.cat([f, f[:n_neg]]) for f in feats]
        text = torch.cat([text, neg])
        target = torch.cat([target, torch.zeros_like(target[:n_neg])])
    logits = backend.decode(feats, text)
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    n = len(prompts)
    loss = dice_bce_loss(logits[:n], target[:n])
    if n_neg:
        loss = loss + settings.negative_fraction * dice_bce_loss(logits[n:], target[n:])
    return loss
