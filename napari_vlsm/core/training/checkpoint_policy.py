"""When a run writes last/ and best/, which epoch best/ keeps, what a resumed run goes on
from, and what is said of the checkpoints when a run stops. Writing them atomically is
``checkpoint.py``'s."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from napari_vlsm.core.errors import TrainingError
from napari_vlsm.core.models.backend import TorchBackend
from napari_vlsm.core.training.checkpoint import BEST, LAST, copy_checkpoint, read_metadata, save_checkpoint, unsound
from napari_vlsm.core.training.clock import Clock

CHECKPOINT_EVERY_S = 60  # a round of corrections saves at its end; a longer run also every this often


@dataclass
class Checkpoints:
    """A run's last/ and best/ and what goes into them: ``meta`` (training.json; the loop
    keeps its history and epoch count up to date) and ``extras`` (the replay sample, the
    model card). Only rank 0 writes."""
    backend: TorchBackend
    out: Path
    rank: int
    meta: dict
    extras: dict
    clock: Clock
    saved_at: float = -math.inf

    def save(self, improved: bool, informative: bool, final: bool = False, best_is_last: bool = False,
             val: float | None = None) -> str | None:
        """last/ (and best/ when improved) after the first epoch, at the end, when validation
        improved, and otherwise every CHECKPOINT_EVERY_S: a short round is not slowed down by
        writing every epoch. ``best_is_last``: the weights are the ones to keep (the schedule's
        end when validation says nothing). best/ is then a copy of last/ that shares its weight
        files, written in a fraction of the time. Weights that are not finite, or answer with
        values that are not (``unsound``; ``val``: the validation Dice), are never saved: the
        run stops with a TrainingError and the checkpoints stay as they were."""
        due = final or time.time() - self.saved_at > CHECKPOINT_EVERY_S
        if self.rank != 0 or not (due or (improved and informative)):
            return None
        self._check_sound(val)
        self.saved_at = time.time()
        with self.clock("checkpoints"):
            save_checkpoint(self.backend, self.out / LAST, self.meta, self.extras)
            return str(copy_checkpoint(self.out / LAST, self.out / BEST)) if improved or best_is_last else None

    def save_best(self) -> str:
        self._check_sound()
        with self.clock("checkpoints"):
            return str(save_checkpoint(self.backend, self.out / BEST, self.meta, self.extras))

    def _check_sound(self, val: float | None = None) -> None:
        why = unsound(self.backend, val)
        if why:
            raise TrainingError(f"After epoch {self.meta.get('epochs_done', '?')} the model {why}; it was not "
                                f"saved and training stopped. {stopped_message(self.out)} Try a lower learning "
                                "rate.")


def resume_point(out: Path, resume: bool, names: list[str], epochs: int) -> tuple[int, list, int]:
    """(first epoch, history, round) of a run: 0, [], 1 for a new one; where it stopped when
    resumed on the same set (the same image names); a new round from epoch 0 when examples were
    added or replaced."""
    if not (resume and (out / LAST).exists()):
        return 0, [], 1
    done = read_metadata(out / LAST)
    history, round_no = done.get("history", []), done.get("round", 1)
    same = (done["trained_names"] == names if "trained_names" in done
            else done.get("train_examples") == len(names))  # a run from before the names were kept
    if same:
        return min(done.get("epochs_done", 0), epochs), history, round_no
    return 0, history, round_no + 1


def stopped_message(out: Path) -> str:
    if (out / BEST).exists():
        return f"The last good checkpoint is intact at {out / 'best'}."
    return "No checkpoint had been written yet."
