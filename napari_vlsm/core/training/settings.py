"""The finetuning recipe's settings, one dataclass for the command line, the widget and the
library: light to import (no torch), so the CLI reads its defaults and help numbers here."""

from __future__ import annotations

from dataclasses import dataclass, field

from napari_vlsm.core.data.prompts import TRAIN_PROMPT_TYPES
from napari_vlsm.core.models.train_modes import AUTO_MODE, TRAIN_MODES_OFFERED  # noqa: F401  (the Finetune dock's)

ROUND_STEPS = 100    # optimiser steps of a round of up to ROUND_SIZE corrections (docs/corrections.md)
ROUND_PASSES = 8     # a larger set: enough steps for each example to be drawn about this many times
ROUND_AVERAGE = 0.98  # decay of the moving average of the weights that a round keeps
NEW_SHARE = 0.0      # a round that continues a model: the share of draws from the corrections new to it
                     # (0: every correction drawn alike; half for the new ones made later rounds learn less
                     # on four never-seen domains, docs/corrections.md)
SMALL_SET = 100      # below this many examples, all of them train (no validation hold-out)
SCHEDULES = ("onecycle", "plateau")


def round_size(per_batch: int) -> int:
    """The most examples a round of ROUND_STEPS steps trains on, ``per_batch`` of them a step,
    before a larger set gets more steps (``TrainSettings.round_steps``)."""
    return ROUND_STEPS * per_batch // ROUND_PASSES


@dataclass
class TrainSettings:
    mode: str = AUTO_MODE          # auto (the backend's own) | one of TRAIN_MODES
    epochs: int | None = None      # None: enough epochs for about `steps` steps
    steps: int | None = None       # optimiser steps of a round when epochs are not given (None: round_steps)
    lr: float | None = None        # None: the backend's default for the mode (default_lr)
    batch_size: int = 8
    weight_decay: float = 1e-3
    val_fraction: float | None = None  # None: 0 below SMALL_SET examples, else 0.2
    patience: int = 5              # epochs without validation gain before stopping
    grad_clip: float = 1.0
    augment: bool = True
    crop: int | None = None        # random crops of this side (None: the model's default_crop; 0: none)
    schedule: str = "onecycle"     # onecycle | plateau
    replay_fraction: float | None = None  # share of each batch from the base's replay sample (None: see replay_share)
    keep_norm_stats: bool = False  # keep the base's batch-norm statistics (measured: learns a new domain worse)
    encoder_lr_scale: float = 1.0  # the image encoder's learning rate relative to the rest
    new_share: float | None = NEW_SHARE  # a continued round: share of draws from corrections new to the model (0: as they come)
    frozen_levels: int | None = None  # image-encoder levels (from the input) that do not train (None: the model's)
    anchor: float = 0.0            # L2 pull of the weights toward the starting model's (L2-SP)
    adapters: str = "auto"         # auto: a class new to a trained FiLM-UNet gets its own adapter; off
    prompt_types: tuple = TRAIN_PROMPT_TYPES
    val_prompt_type: str = "p1"
    negative_prompts: list = field(default_factory=list)  # prompts for absent things -> empty target
    negative_fraction: float = 0.25  # share of each batch decoded again with a negative prompt
    empty_tolerance: float = 0.0     # Dice smoothing on empty targets as a share of the pixels (0: smooth 1)
    cross_negatives: bool = True     # prompts of one pooled concept are negatives on the others' images
    synonyms: dict = field(default_factory=dict)  # data folder name -> extra prompts ("breast tumor")
    repeat: dict = field(default_factory=dict)    # data folder name -> times its examples appear per epoch
    guidance_share: float = 0.5    # a model that takes clicks: share of the images with their object that train
                                   # with simulated clicks or a box (core/training/click_simulation.py)
    click_iterations: int = 3      # at most this many corrective clicks from the model's own prediction
    seed: int = 0
    threads: int | None = None     # CPU threads for torch (None: the cores this process may use)
    weight_average: float | None = None  # decay of a moving average of the weights, validated and saved
                                         # (None: ROUND_AVERAGE; 0: off)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule is {' or '.join(SCHEDULES)}, not {self.schedule!r}.")
        if self.crop is not None and (not isinstance(self.crop, int) or self.crop < 0):
            raise ValueError(f"crop is the side of the random crops in pixels (0: none, None: the model's own), "
                             f"not {self.crop!r}.")

    def round_steps(self, n_examples: int, per_batch: int) -> int:
        """The steps of a round: the given number, else ROUND_STEPS for a set of corrections (a
        round of up to ``round_size(per_batch)`` of them takes the same short time), and for a
        larger set enough for each of its ``n_examples`` to be drawn about ROUND_PASSES times,
        ``per_batch`` a step."""
        if self.steps:
            return self.steps
        return max(ROUND_STEPS, -(-ROUND_PASSES * n_examples // max(per_batch, 1)))

    def average_decay(self) -> float:
        return ROUND_AVERAGE if self.weight_average is None else self.weight_average

    def learning_rate(self, backend=None, adapter: bool = False, new_adapter: bool = False) -> float:
        """The given rate, or the backend's default for the mode; for an adapter's round its own,
        and for the first round of a new adapter that one where the backend has it."""
        if self.lr is not None:
            return self.lr
        from napari_vlsm.core.models.backend import TorchBackend

        table = backend.default_lr if backend is not None else TorchBackend.default_lr
        for key in ("new adapter" if new_adapter else None, "adapter" if adapter else None, self.mode):
            if key in table:
                return table[key]
        return 1e-4

    def replay_share(self, adapter: int | None) -> float:
        """Half of each batch for the shared network (old classes keep being answered); an
        eighth, as negatives, for an adapter (docs/corrections.md: the new class is learned
        faster, at the price of the new word firing more often on the old domains)."""
        if self.replay_fraction is not None:
            return self.replay_fraction
        return 0.125 if adapter else 0.5

    def holdout(self, n_examples: int) -> float:
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.0 if n_examples < SMALL_SET else 0.2


_RECIPE = TrainSettings()
# The round of corrections the command line, the docks and the docs quote (87): a new class's
# adapter, whose batches of 8 hold one replay pair.
ROUND_SIZE = round_size(_RECIPE.batch_size - round(_RECIPE.batch_size * _RECIPE.replay_share(adapter=1)))
