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
    the random initial weights are forgotten quickly. ``params``: the weights that train (the
    rest cannot change, so averaging it would cost time for nothing); the saved buffers
    (batch-norm statistics) are always averaged."""

    def __init__(self, module: torch.nn.Module, decay: float, params=None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"The weight-average decay is between 0 and 1 (such as 0.998), not {decay}.")
        self.decay, self.steps = decay, 0
        wanted = None if params is None else {id(p) for p in params}
        self.names = [k for k, p in module.named_parameters() if wanted is None or id(p) in wanted]
        state = module.state_dict()
        # a non-persistent buffer (CLIP's position ids) is not in the state dict: nothing to average
        self.names += [k for k, _ in module.named_buffers() if k in state]
        self.state = {k: state[k].detach().clone() for k in self.names}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        state = module.state_dict()
        for k, avg in self.state.items():
            if avg.is_floating_point():
                avg.lerp_(state[k].detach(), 1.0 - d)
            else:  # counters such as num_batches_tracked
                avg.copy_(state[k])

    @contextmanager
    def applied(self, module: torch.nn.Module):
        """The module holds the average inside the block and its own weights again after it."""
        state = module.state_dict()
        live = {k: state[k].detach().clone() for k in self.names}
        module.load_state_dict(self.state, strict=False)
        try:
            yield
        finally:
            module.load_state_dict(live, strict=False)
