"""An exponential moving average of a model's weights and batch-norm statistics.

Validated and saved in place of the live weights, it smooths the epoch-to-epoch swings of a
small model trained from scratch on pooled modalities (docs/offline_model.md): the average
holds the statistics of many more batches than batch norm's own running estimate.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """``update`` after each optimiser step; ``applied`` swaps the average in for a while.

    The decay ramps up over the first steps (``(1 + t) / (10 + t)``, capped at ``decay``) so
    the random initial weights are forgotten quickly."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"The weight-average decay is between 0 and 1 (such as 0.998), not {decay}.")
        self.decay, self.steps = decay, 0
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in module.state_dict().items():
            avg = self.state[k]
            if avg.is_floating_point():
                avg.lerp_(v.detach(), 1.0 - d)
            else:  # counters such as num_batches_tracked
                avg.copy_(v)

    @contextmanager
    def applied(self, module: torch.nn.Module):
        """The module holds the average inside the block and its own weights again after it."""
        live = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.state)
        try:
            yield
        finally:
            module.load_state_dict(live)
