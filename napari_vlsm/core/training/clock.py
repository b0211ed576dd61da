"""Where the time of a training run goes, phase by phase."""

from __future__ import annotations

import time
from contextlib import contextmanager


class Clock(dict):
    """Seconds a run spends in each phase (loading, reading images, making batches, the
    optimiser steps, validation, checkpoints): where the time of a round goes."""

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0
